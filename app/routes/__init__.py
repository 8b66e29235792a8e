"""Routers: pages (HTML and htmx fragments), api (/api/v1 JSON); live and labels when present."""
