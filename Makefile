# rkllm-fleet top-level tasks. Everything runs from a fresh clone: `make test` builds what it needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv double test bench lint clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements/dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements/dev.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

double:
	$(MAKE) -C tests/fakelib

lint: venv
	$(VENV)/bin/ruff check rkllm_runtime tests bench

test: venv double
	$(VENV)/bin/pytest -q

clean:
	rm -rf build $(VENV)
