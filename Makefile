# The two commands in the README: `make serve` (set up, then run the service) and
# `make test` (set up, lint, then run the test suite). Both create .venv on first use.
SHARED ?= ../shared
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test test-fast lint bench enhance
setup:
	./scripts/setup.sh

serve: setup
	.venv/bin/sgz serve --host $(HOST) --port $(PORT)

enhance: setup
	.venv/bin/sgz enhance $(SHARED)/data/sice-real -o out/sice-real

# lint: ruff (lint and format) on everything, mypy on model/ and service/ (pyproject.toml)
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: lint
	SGZ_SHARED=$(SHARED) .venv/bin/python -m pytest -q

# the tests not marked slow (end-to-end servers, browsers, Ray, training runs): minutes
test-fast: setup
	SGZ_SHARED=$(SHARED) .venv/bin/python -m pytest -q -m "not slow"

bench: setup
	.venv/bin/sgz bench --shared $(SHARED)
