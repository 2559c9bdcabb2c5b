# The two Quick start commands: `make demo` (main job on the embedded default) and `make test`.
# Both create .venv and install the project into it on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The full pipeline on the embedded demo: DVC stages (run with the venv first on PATH), MLflow
# tracking and registry in ./mlflow.db, then a summary of where everything is.
demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	$(PY) -m pipeline summary

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: $(VENV)/.installed
	$(PY) -m pytest; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

bench: $(VENV)/.installed
	$(PY) -m bench.model_inference
