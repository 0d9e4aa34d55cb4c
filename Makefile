# Everything a fresh machine needs: `make quickstart` and `make test` create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build these machines carry; an unpinned install would pull CUDA.
TORCH_SPEC ?= torch==2.13.0

.PHONY: quickstart test bench bench-quick clean

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

# The web chat test drives Debian's chromium (Playwright's own browser download needs the net).
$(VENV)/.browser-installed: $(VENV)/.dev-installed
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo apt-get install -y -qq chromium; \
	  else echo "make test needs Chromium for the web chat test: as root, run 'apt-get install chromium'."; exit 1; fi; \
	fi
	touch $@

test: $(VENV)/.dev-installed $(VENV)/.browser-installed
	$(PY) -m pytest -q -m "not benchmark"

# Every benchmark, then the summary at the top of docs/BENCHMARKS.md (an hour or more: run it
# on a quiet machine). bench-quick: toy sizes, a few minutes, into runs/benchmarks-quick.md.
bench: $(VENV)/.dev-installed
	nice -n 10 $(PY) -m benchmarks

bench-quick: $(VENV)/.dev-installed
	nice -n 10 $(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) runs build *.egg-info
