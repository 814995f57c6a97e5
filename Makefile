# Every target installs what it needs first (a fresh machine has nothing by hand).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch is pinned to the CPU wheel first: an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install test demo bench bench-job lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check clinicalbert_core jobs tests
	$(VENV)/bin/ruff format --check clinicalbert_core jobs tests
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/clinicalbert demo-data --out out/demo
	$(VENV)/bin/clinicalbert run configs/demo.yaml

bench: $(STAMP)
	$(VENV)/bin/clinicalbert bench --json out/bench.json

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix clinicalbert_core jobs tests
	$(VENV)/bin/ruff format clinicalbert_core jobs tests

clean:
	rm -rf out .pytest_cache .ruff_cache
