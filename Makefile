# `make serve` sets up a virtualenv and runs the whole service on embedded defaults;
# `make test` runs the test suite.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup serve test bench clean

$(BIN)/chestaid: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[test]"
	touch $(BIN)/chestaid

setup: $(BIN)/chestaid

serve: setup
	$(BIN)/chestaid serve

test: setup
	$(BIN)/python -m pytest -ra

bench: setup
	$(BIN)/python bench/bench_pipeline.py

clean:
	rm -rf $(VENV) var inbox .pytest_cache
