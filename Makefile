# fairsynth: `make help` lists the targets. Quick scale (default) runs on the embedded data on a CPU;
# SCALE=full DATA_ROOT=... runs the paper-scale version on a GPU. SMOKE=1 runs a tiny chain into smoke/.
SHELL := /bin/bash
PYTHON ?= .venv/bin/python
SCALE ?= quick
SEED ?= 0
# A GPU box with its own python runs `make <target> PYTHON=python3`: no venv needed there.
SETUP := $(if $(filter .venv/bin/python,$(PYTHON)),.venv/.stamp,)
OUT := $(if $(SMOKE),smoke,results)
export PYTHONUNBUFFERED := 1

.PHONY: help setup test all bench clean-runs

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: .venv/.stamp ## create .venv and install everything (torch from the local disk where it lies there)

.venv/.stamp: requirements.txt requirements-dev.txt
	python3 -m venv .venv
	.venv/bin/pip install --upgrade -q pip
	.venv/bin/pip install -r requirements.txt -r requirements-dev.txt
	touch $@

test: $(SETUP) ## run the test suite (CPU, ~minutes); fails if no test is collected
	$(PYTHON) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here" >&2; exit 1; fi; exit $$rc

clean-runs: ## delete run folders and smoke outputs (never results/)
	rm -rf runs smoke
