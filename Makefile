# artifactqc: `make demo` sets up .venv and runs the whole workflow on the embedded demo cohort;
# `make test` runs the test suite, `snakemake --lint` and dry-runs of the workflow.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SNAKEMAKE := $(BIN)/snakemake
CORES ?= 2
PYTEST_ARGS ?=

.PHONY: demo demo-train test venv lint dryrun clean-demo

# torch first, from the CPU wheel: letting torchio resolve torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(SNAKEMAKE) --configfile config/demo.yaml --cores $(CORES)
	$(SNAKEMAKE) --configfile config/demo.yaml --report results/report.zip

# The demo with the training stage: a short fine-tune of the builtin model (config/demo_train.yaml).
demo-train: venv
	$(SNAKEMAKE) --configfile config/demo.yaml config/demo_train.yaml --cores $(CORES)
	$(SNAKEMAKE) --configfile config/demo.yaml config/demo_train.yaml --report results/report.zip

# pytest exits 5 when it collected no tests: that is a failure here, like any non-zero exit.
test: venv
	$(BIN)/pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory lint dryrun

lint: venv
	$(SNAKEMAKE) --lint
	$(SNAKEMAKE) --lint --configfile config/demo.yaml
	$(SNAKEMAKE) --lint --configfile config/demo.yaml config/demo_train.yaml

dryrun: venv
	$(SNAKEMAKE) -n --quiet rules --configfile config/demo.yaml
	$(SNAKEMAKE) -n --quiet rules --configfile config/demo.yaml config/demo_train.yaml
	$(SNAKEMAKE) -n --quiet rules

clean-demo:
	rm -rf results logs .snakemake
