# tmem broker: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo cluster-demo test test-fast check bench system-deps services clean

# [test] pulls in [server] (the broker) and [sim] (the simulator's plots) beside the test tools;
# a guest needs only `pip install tmem-broker` (README, Install).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

## make demo: a broker on the embedded default (SQLite) plus a few simulated guests
demo: $(STAMP)
	$(PY) -m scripts.demo

## make cluster-demo: three brokers as one pool over a real Redis Cluster and PostgreSQL
## (docs/scale.md): guests spread over them, the pooled stats, a broker killed and taken over
cluster-demo: $(STAMP) system-deps services
	$(PY) -m scripts.cluster_demo

## make test: the whole suite (installs system packages and starts services it needs)
test: $(STAMP) system-deps services
	$(PY) -m pytest $(PYTEST_ARGS)

## make test-fast: the suite without the slow real-VM and soak tests
test-fast: $(STAMP) system-deps services
	$(PY) -m pytest --skip-slow $(PYTEST_ARGS)

check: $(STAMP)
	$(VENV)/bin/ruff check broker guest_agent schemas tests bench scripts migrations
	$(VENV)/bin/ruff format --check broker guest_agent schemas tests bench scripts migrations
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/lint-imports --no-cache  # the rooms' import contracts (pyproject.toml)

bench: $(STAMP) system-deps services
	$(PY) -m bench.run_all

system-deps:
	bash scripts/system-deps.sh

services:
	bash scripts/services.sh

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
