# The two commands a newcomer needs: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup serve test test-unit bench model

setup:
	@bash scripts/setup.sh

# Install everything, then serve the embedded default model on 127.0.0.1:8000.
serve: setup
	$(VENV)/bin/ssrl serve $(ARGS)

# Install everything, then run the whole test suite (unit + real-engine tests).
test: setup
	$(VENV)/bin/ssrl model prepare
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m "not engine" $(PYTEST_ARGS)

model: setup
	$(VENV)/bin/ssrl model prepare

bench: setup
	$(PY) -m bench.run $(or $(BENCH),suite) $(ARGS)
