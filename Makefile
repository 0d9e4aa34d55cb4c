# Everything a fresh machine needs: `make quickstart` and `make test` create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build these machines carry; an unpinned install would pull CUDA.
TORCH_SPEC ?= torch==2.13.0

.PHONY: quickstart test bench clean

$(VENV)/.base-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.base-installed
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

quickstart: $(VENV)/.base-installed
	$(VENV)/bin/promethean quickstart

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q -m "not benchmark"

bench: $(VENV)/.dev-installed
	$(PY) benchmarks/decode.py --write docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) runs build *.egg-info
