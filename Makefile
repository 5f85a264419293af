# The two commands a newcomer needs: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup serve test test-unit lint format bench model image-test

setup:
	@bash scripts/setup.sh

# Install everything, then serve the embedded default model on 127.0.0.1:8000.
serve: setup
	$(VENV)/bin/ssrl serve $(ARGS)

# The gate CI runs before the tests: lint, formatting, types, and the layer contracts.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_layers.py

# Rewrite the tree in the house style (what `make lint` checks).
format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Install everything, lint, then run the whole test suite (unit + real-engine tests).
# SSRL_PARITY=1 (the default here) also starts vLLM's own OpenAI server and compares ssrl's
# plain answers with it field by field (tests/e2e/test_parity.py); SSRL_PARITY=0 skips that half.
test: setup lint
	$(VENV)/bin/ssrl model prepare
	SSRL_PARITY=$${SSRL_PARITY-1} $(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m "not engine" $(PYTEST_ARGS)

model: setup
	$(VENV)/bin/ssrl model prepare

bench: setup
	$(PY) -m bench.run $(or $(BENCH),suite) $(ARGS)

# Build the CPU image with podman, run it, and check it for real (health check, a self-search
# chat, non-root, SIGTERM drain); removes what it made. Slow, so not part of `make test`; skips
# where podman is not installed. deploy/image-test.sh lists its settings.
image-test: setup
	bash deploy/image-test.sh
