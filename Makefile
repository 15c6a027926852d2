# Two commands on a fresh machine:  make run   |   make test
# GPU clusters: make install TORCH_SPEC="torch==2.6.0" (or any build in setup.py's range).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
CONFIG      ?= configs/smoke_9client.yaml
NP          ?= 9
# MPICH's mpiexec kills the whole job after this many seconds: a hung collective can
# never hold a node forever.
MPIEXEC_TIMEOUT ?= 1800
PYTEST_ARGS ?=

.PHONY: install system-deps run test clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: with it present, setup.py's torch range pulls nothing more (an open
	# range alone would download a multi-GB CUDA build on a CPU machine).
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) system-deps

# pycocoevalcap's PTB tokenizer runs Java; h5dump (hdf5-tools) reads checkpoints.
system-deps:
	@command -v java >/dev/null 2>&1 || { echo "installing a Java runtime (pycocoevalcap needs it)"; \
		apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null; }
	@command -v h5dump >/dev/null 2>&1 || { echo "installing hdf5-tools (h5dump)"; \
		apt-get update -qq && apt-get install -y -qq hdf5-tools >/dev/null; }

run: install
	MPIEXEC_TIMEOUT=$(MPIEXEC_TIMEOUT) $(BIN)/mpiexec -n $(NP) $(BIN)/python -m pilot_hpc.main --config $(CONFIG)

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q tests kernels $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
