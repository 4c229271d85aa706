# Two commands do all the set-up: `make run` (main job on the embedded dataset) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/.dagster
export OMP_NUM_THREADS := 1
export HF_HUB_OFFLINE := 1

.PHONY: venv run test ui validate clean

venv: $(STAMP)

# torch is pinned to the CPU wheel through constraints.txt: an unpinned torch would pull gigabytes of CUDA packages.
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Run queue and concurrency pools: see deploy/dagster.yaml.
$(DAGSTER_HOME)/dagster.yaml: deploy/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp deploy/dagster.yaml $@

run: venv $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m pipelines.run $(EXPERIMENT)

# One worker per logical core; a test file stays on one worker, so a module's materialized experiment is built once.
test: venv
	$(BIN)/python -m pytest -n logical --dist loadfile

ui: venv $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

validate: venv
	$(BIN)/dagster definitions validate -w workspace.yaml

clean:
	rm -rf artefacts .dagster
