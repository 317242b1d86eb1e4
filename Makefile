# dlrun developer tasks. `make train` and `make test` are all a fresh machine needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest

.PHONY: setup train lint format test test-full bench clean

setup: $(STAMP)

# Re-install only when the dependency list changes; otherwise `make setup` is a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: setup
	$(BIN)/dlrun train

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(PYTEST) -m "not slow" -q

test-full: lint
	$(PYTEST) -q

bench: setup
	$(BIN)/python -m benchmarks.train_throughput
	$(BIN)/python -m benchmarks.time_to_accuracy
	$(BIN)/python -m benchmarks.startup
	$(BIN)/python -m benchmarks.quantized_latency
	$(BIN)/python -m benchmarks.compression
	$(BIN)/python -m benchmarks.vs_lightning      # the peers: pip install -e '.[bench]'
	$(BIN)/python -m benchmarks.vs_onnxruntime

clean:
	rm -rf outputs multirun .pytest_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
