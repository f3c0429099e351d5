# Set-up is part of every target: a fresh machine needs only Python 3.11 and make.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch/torchvision first (pinned, from the local wheel mirror), then everything
# else under the same constraints. Re-runs are no-ops unless the pins changed.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,ray]'
	# an editable install is not byte-compiled by pip: compile it once, so that every
	# process (CLI, executor workers) loads .pyc even where PYTHONDONTWRITEBYTECODE is set
	$(BIN)/python -m compileall -q -j 0 ccurate ingest filters captioning shards train > /dev/null
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/ccurate demo --out demo-out

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ''

lint: install
	$(BIN)/ruff check .
	$(BIN)/python tools/mypy_check.py

bench: install
	@echo "benchmarks: see bench/README.md"

clean:
	rm -rf $(VENV) demo-out build *.egg-info
