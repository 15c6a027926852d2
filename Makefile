# Two commands on a fresh machine:  make run   |   make test
# GPU clusters: make install TORCH_SPEC="torch==2.6.0" (or any build in setup.py's range).

PYTHON      ?= python3
VENV        ?= .venv
CPU_TORCH   := torch==2.13.0
TORCH_SPEC  ?= $(CPU_TORCH)
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
# The versions the suite last passed with: a new release of a dependency cannot change a
# fresh machine's install (transformers 5.25 began to require the PyPI project `kernels`,
# and CI broke on it, 2026-12-03). CONSTRAINTS= installs the newest in setup.py's ranges.
CONSTRAINTS ?= constraints.txt
# Triton is pinned by a CUDA torch build itself; the CPU torch leaves it free, so the default
# install pins the one the suite passed with (constraints.txt leaves torch's own pins out).
ifeq ($(TORCH_SPEC),$(CPU_TORCH))
TORCH_PEERS ?= triton==3.9.0
endif
CONFIG      ?= configs/smoke_9client.yaml
NP          ?= 9
# MPICH's mpiexec kills the whole job after this many seconds: a hung collective can
# never hold a node forever.
MPIEXEC_TIMEOUT ?= 1800
PYTEST_ARGS ?=

.PHONY: install system-deps run test test-fast clean gpu-wheels gpu-check

$(STAMP): setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: with it present, setup.py's torch range pulls nothing more (an open
	# range alone would download a multi-GB CUDA build on a CPU machine).
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(TORCH_PEERS)
	$(BIN)/pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev,deepspeed]"
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

# The tests compare runs with each other on one machine, never with numbers made elsewhere,
# so they take the CPU's native math paths (14% faster than the pinned ones, BENCHMARKS.md);
# tests/unit/test_cpumath.py checks the pins themselves in fresh processes.
# The test files run on TEST_WORKERS pytest-xdist workers (logical: one per CPU the machine
# shows), one file per worker at a time, so a file's module fixtures run once; the session's
# small world and its two runs are built once for all workers (tests/conftest.py). A
# sequential run left a 2-core machine 41% idle (one minute of /proc/stat mid-run) while
# tests waited on processes, Slurm and MPI. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= logical
test: install
	PILOT_HPC_CPU_MATH=native PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) \
		--dist loadfile tests kernels $(PYTEST_ARGS)

# The unit tests alone (tests/unit: no mpiexec, no whole runs, no Slurm).
test-fast: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m unit tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info

# ---- GPU check (README, "GPU check") ----------------------------------------------------
# The packages the GPU machine's python3 lacks (its image has torch, triton, transformers,
# peft, mpi4py, h5py, pyarrow, pandas, fsspec, ...): the MPI library for mpi4py, and
# `datasets` (pilot_hpc.main imports it) with the two of its needs the image lacks.
# Pinned: two versions of one package in the folder would stop the install there.
GPU_WHEEL_DIR ?= .gpu_wheels
GPU_WHEELS    ?= mpich==5.0.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
GPU_CHECK_OUT ?= runs/gpu_check
GPU_PLATFORMS := $(foreach n,2_28 2_27 2_17,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64 \
                 --platform manylinux1_x86_64

# Wheels for the GPU machine (Python 3.12, x86-64), into an ignored folder that must
# travel with the tree (carry it): everything that travels must stay under 64 MiB.
gpu-wheels:
	rm -rf $(GPU_WHEEL_DIR) && mkdir -p $(GPU_WHEEL_DIR)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_WHEEL_DIR) $(GPU_WHEELS)
	@ls -l $(GPU_WHEEL_DIR)
	@$(PYTHON) -c "import pathlib, sys; n = sum(p.stat().st_size for p in pathlib.Path('$(GPU_WHEEL_DIR)').glob('*.whl')); \
		print(f'$(GPU_WHEEL_DIR): {n / 2**20:.1f} MiB of wheels (the tree that travels must stay under 64 MiB)'); \
		sys.exit(n > 48 * 2**20 and 'more than 48 MiB of wheels: too little room is left for the tree')"

# On the GPU machine, from the repository root, with its own python3 (nothing to install):
# every GPU path in under 8 minutes; without CUDA it says so in one line and exits 2.
gpu-check:
	$(PYTHON) scripts/gpu_check.py --out $(GPU_CHECK_OUT) --wheels $(GPU_WHEEL_DIR)
