# saescope: one image for the app, the migrations and the train/precompute pipeline.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SAESCOPE_CACHE=/cache

WORKDIR /srv/saescope

# The CPU build of torch (the default index would pull a multi-GB CUDA build).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY sae_core ./sae_core
COPY app ./app
COPY templates ./templates
COPY static ./static
RUN pip install -e .
# The label rule search is compiled by numba on first use (~30 s): compile it into the image.
RUN python -c "from sae_core.labels.induction import compile_search; compile_search()"

# Converted models, tokenised corpora, activation caches and trained SAEs live here.
VOLUME ["/cache"]
EXPOSE 8000

CMD ["saescope", "serve", "--host", "0.0.0.0", "--port", "8000"]
