# ditkit — the two commands of the README: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DITKIT := $(VENV)/bin/ditkit
DEMO_RUN ?= runs/demo
DEMO_MINUTES ?= 10
# Muon trains the 10-minute demo better than AdamW (four runs of four, docs/BENCHMARKS.md "Round 39"), and
# with its weight decay (--weight-decay auto: 0.1) five 30-minute runs read 0.79-1.10x the floor
# ("Round 40", "Round 41"); ditkit train's default since round 41, named here so that
# DEMO_OPTIMIZER=adamw can swap it
DEMO_OPTIMIZER ?= muon

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

# About DEMO_MINUTES of CPU training of the default recipe, then a guided sample grid and the loss curve.
demo: data
	rm -rf $(DEMO_RUN)
	$(DITKIT) train --out $(DEMO_RUN) --max-minutes $(DEMO_MINUTES) --optimizer $(DEMO_OPTIMIZER)
	$(DITKIT) sample --ckpt $(DEMO_RUN) --out $(DEMO_RUN)/grid.png --out $(DEMO_RUN)/samples.npz \
		--num 100 --labels all --sampler dpm++2m --autoguidance 2 --guidance-interval 0.6,inf --reject 0.08
	$(DITKIT) sample --ckpt $(DEMO_RUN) --out $(DEMO_RUN)/grid_cfg.png --num 100 --labels all --cfg-scale 1.35
	@echo "grids: $(DEMO_RUN)/grid.png (dpm++2m, autoguidance 2 at sigma >= 0.6, rejection 0.08: the best after 10 minutes),"
	@echo "       $(DEMO_RUN)/grid_cfg.png (dpm++2m-sde, guidance 1.35: a third of the sampling time)"
	@echo "loss curve: $(DEMO_RUN)/loss.png   run folder: $(DEMO_RUN)"

test: $(VENV)/.installed-test
	bash scripts/ensure-chromium.sh
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs build *.egg-info
