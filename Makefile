# vadbench — `make repro` runs the benchmark, `make test` runs the test suite.
# Both create .venv with Python 3.11 when it is missing.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
# No MALLOC_MMAP_THRESHOLD_ here: it made CPU training 2.2x slower (STFPM, 4 epochs: 14.1 s vs 6.5 s),
# and the coreset keeps its memory flat with preallocated buffers (benchmarks/results/coreset.md).
export HF_HUB_OFFLINE := 1
export OMP_NUM_THREADS ?= $(shell nproc 2>/dev/null || echo 2)
# Spinning OpenMP waits made 2-thread training 5-10x slower whenever anything else ran (measured).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: repro test test-fast lint verify validate install bench peer-env peer-bench profile-paper profile-full profile-workstation clean-data prune-lock help

help:
	@echo "make repro          install (if needed), validate params.yaml, dvc repro"
	@echo "make test           install with test extras (if needed), run the whole test suite"
	@echo "make test-fast      the suite without tests marked slow"
	@echo "make lint           ruff check + ruff format --check (part of make test)"
	@echo "make verify         small grid twice from clean: byte-identical outputs and dvc.lock (docs/CI.md)"
	@echo "make prune-lock     drop dvc.lock entries of stages dvc.yaml no longer defines (commit it)"
	@echo "make bench          run benchmarks/ (writes benchmarks/results/*.md)"
	@echo "make peer-env       .venv-peer: anomalib (pyproject's [peer] pins) in its own interpreter"
	@echo "make peer-bench     benchmarks/peer_anomalib.py: vadbench vs anomalib side by side"
	@echo "make profile-paper  switch params.yaml to the paper-scale profile (profiles/paper.yaml)"
	@echo "make profile-full   switch params.yaml to every registered model at CPU budgets (profiles/full.yaml)"
	@echo "make profile-workstation  switch params.yaml to the study's fractal recipe at <= 1 h (profiles/workstation.yaml)"
	@echo "make plots-deps     chromium + pinned vega builds: offline dvc plots show page and its test"

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required; set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

validate: $(STAMP)
	$(BIN)/vadbench validate params.yaml

repro: validate
	$(BIN)/dvc repro

# the offline plots-page test needs headless Chromium and the pinned vega builds (plots-deps)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) plots-deps lint
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) plots-deps
	$(BIN)/python -m pytest -q -m 'not slow'

# two clean runs of a small grid must be byte-identical and agree with profiles/verify-locks/<machine kind>.lock
verify: $(STAMP)
	$(BIN)/python scripts/verify.py

# DVC never drops lock entries of stages that left the grid; each stage rereads the whole lock
prune-lock: $(STAMP)
	$(BIN)/python scripts/prune_lock.py

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# anomalib for benchmarks/peer_anomalib.py in its own interpreter: the [peer] extra's pins, without our package
PEER_VENV := .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed
$(PEER_STAMP): pyproject.toml
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 timm==1.0.31 numpy==2.4.6
	$(PEER_VENV)/bin/python -m pip install --quiet $$($(PYTHON) -c "import tomllib; \
		print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['peer']))")
	@touch $(PEER_STAMP)

peer-env: $(PEER_STAMP)

peer-bench: $(STAMP) $(PEER_STAMP)
	$(BIN)/python benchmarks/peer_anomalib.py

profile-paper: $(STAMP)
	$(BIN)/vadbench profile paper

# every registered model at the default's CPU budgets (profiles/make_full.py)
profile-full: $(STAMP)
	$(BIN)/vadbench profile full

# the recipe study's fractal pretraining at a workstation budget, ELPV + synthetic_sem (profiles/make_workstation.py)
profile-workstation: $(STAMP)
	$(BIN)/vadbench profile workstation

clean-data:
	rm -rf data/fractals data/pretrain data/backbones data/prepared data/fits data/scores

# Offline `dvc plots show` page and its browser test (docs/PLOTS.md): Debian's chromium (apt-get, as root)
# and the pinned vega/vega-lite/vega-embed builds (npm pack, integrity-checked) in .cache/vega/.
# Idempotent: with both in place it only checks them (well under a second).
.PHONY: plots-deps
plots-deps:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || { \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }; \
	  else echo "error: chromium not found; install it (Debian: sudo apt-get install -y chromium) and rerun make plots-deps"; exit 1; fi; }
	@python3 scripts/fetch_vega.py --check >/dev/null 2>&1 || { \
	  command -v npm >/dev/null 2>&1 || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "installing npm (apt-get)"; \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null 2>&1 || { \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; }; \
	    else echo "error: npm not found; install Node.js/npm (Debian: sudo apt-get install -y npm) and rerun make plots-deps"; exit 1; fi; }; \
	  python3 scripts/fetch_vega.py; }
	@python3 scripts/fetch_vega.py --check
