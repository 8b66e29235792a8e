# The two set-up commands the README documents. `.ci/run` calls `make test`.
PYTHON ?= python3

.PHONY: demo test install install-dev

install:
	$(PYTHON) -m pip install -e .

install-dev:
	$(PYTHON) -m pip install -e '.[dev,embed]'

# Fetch SmolLM2-135M, train an SAE on layer 15, precompute, label, serve on http://127.0.0.1:8000
demo: install
	saescope demo

# The whole test suite (SQLite and PostgreSQL paths, browser tests in headless Chromium).
test: install-dev
	$(PYTHON) -m pytest -q
