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

.PHONY: install system-deps run test test-fast clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: with it present, setup.py's torch range pulls nothing more (an open
	# range alone would download a multi-GB CUDA build on a CPU machine).
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,deepspeed]"
	touch $(STAMP)

install: $(STAMP) system-deps

# Debian packages: Java for pycocoevalcap's PTB tokenizer, h5dump (hdf5-tools) for
# checkpoints, and slurm-wlm + munge for the tests' local single-node Slurm.
system-deps:
	@missing=""; \
	command -v java >/dev/null 2>&1 || missing="$$missing default-jre-headless"; \
	command -v h5dump >/dev/null 2>&1 || missing="$$missing hdf5-tools"; \
	command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ] || missing="$$missing slurm-wlm"; \
	command -v munged >/dev/null 2>&1 || [ -x /usr/sbin/munged ] || missing="$$missing munge"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

run: install
	MPIEXEC_TIMEOUT=$(MPIEXEC_TIMEOUT) $(BIN)/mpiexec -n $(NP) $(BIN)/python -m pilot_hpc.main --config $(CONFIG)

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q tests kernels $(PYTEST_ARGS)

# The unit tests alone (tests/unit: no mpiexec, no whole runs, no Slurm).
test-fast: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m unit tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
