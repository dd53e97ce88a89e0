# The two commands of the README: `make up` (main job, embedded default) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup up test bench clean

setup: $(VENV)/.installed

# torch first, from the CPU build on disk; the constraints file keeps every later install on it.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/pip check
	touch $@

up: setup
	$(BIN)/autoglm up

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/ingest.py --dataset ../shared/data/scifact
	$(BIN)/python bench/learning.py --dataset ../shared/data/scifact

clean:
	rm -rf $(VENV) autoglm-data
