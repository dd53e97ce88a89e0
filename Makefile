# The two commands of the README: `make up` (main job, embedded default) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup system up test bench clean

# Debian packages the tests use: a real Postgres (CDC source), Java 17 (Debezium in-process) and
# docker-compose (validates docker-compose.yml; no engine needed).
SYSTEM_PACKAGES := postgresql openjdk-17-jre-headless docker-compose

setup: $(VENV)/.installed

system:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v java >/dev/null || ! command -v docker-compose >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); fi

# torch first, from the CPU build on disk; the constraints file keeps every later install on it.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/pip check
	touch $@

up: setup
	$(BIN)/autoglm up

test: setup system
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/ingest.py --dataset ../shared/data/scifact
	$(BIN)/python bench/learning.py --dataset ../shared/data/scifact
	$(BIN)/python bench/promotion.py
	$(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) autoglm-data
