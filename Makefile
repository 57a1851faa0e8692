# ditkit — the two commands of the README: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DITKIT := $(VENV)/bin/ditkit
DEMO_RUN ?= runs/demo
DEMO_MINUTES ?= 10

.PHONY: install data demo test bench clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=python3.x)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# the test tools (pytest, diffusers for the side-by-side benchmark, schemathesis, Ray Serve, ...)
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

data: install
	$(DITKIT) data mnist

# About DEMO_MINUTES of CPU training of the default recipe; the run then chooses its own sampling setting
# (ditkit tune, ~10% of the training time), which `ditkit sample` uses: a grid of 10 images per digit.
demo: data
	rm -rf $(DEMO_RUN)
	$(DITKIT) train --out $(DEMO_RUN) --max-minutes $(DEMO_MINUTES)
	$(DITKIT) sample --ckpt $(DEMO_RUN) --out $(DEMO_RUN)/grid.png --out $(DEMO_RUN)/samples.npz --num 100 --labels all
	@echo "grid: $(DEMO_RUN)/grid.png (the run's own sampling setting: $(DEMO_RUN)/sampling.json)"
	@echo "loss curve: $(DEMO_RUN)/loss.png   run folder: $(DEMO_RUN)"

test: $(VENV)/.installed-test
	bash scripts/ensure-chromium.sh
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs build *.egg-info
