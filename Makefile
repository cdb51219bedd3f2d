# The two entry points of a fresh machine: `make demo` (the service on an XTC2 run through shmemServer)
# and `make test` (lint, types, tests). Both install what they need first, idempotently.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo serve test lint
install:
	bash deploy/install.sh

demo: install
	$(BIN)/lcls-hitfinder demo

serve: install
	$(BIN)/lcls-hitfinder serve

lint: install
	$(BIN)/ruff check lcls_hitfinder tests benchmarks deploy experiments
	$(BIN)/ruff format --check lcls_hitfinder tests benchmarks deploy experiments
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q -ra
