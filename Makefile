# The two commands in the README: `make serve` (set up, then run the service) and
# `make test` (set up, then run the test suite). Both create .venv on first use.
SHARED ?= ../shared
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test bench enhance
setup:
	./scripts/setup.sh

serve: setup
	.venv/bin/sgz serve --host $(HOST) --port $(PORT)

enhance: setup
	.venv/bin/sgz enhance $(SHARED)/data/sice-real -o out/sice-real

test: setup
	SGZ_SHARED=$(SHARED) .venv/bin/python -m pytest -q

bench: setup
	.venv/bin/sgz bench --shared $(SHARED)
