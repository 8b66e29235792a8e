"""saescope's web browser and REST API over a precomputed store (``app.main.create_app``)."""
