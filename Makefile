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

demo: $(VENV)/.installed
	$(VENV)/bin/urd run

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: $(VENV)/.installed
	$(PY) -m pytest; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

bench: $(VENV)/.installed
	$(PY) bench/model_inference.py
