"""pytest setup for pilot_hpc_kernels: Triton's interpreter on CPU-only machines, and
collection of the microbenchmarks (benchmark_*.py) next to the tests."""

from __future__ import annotations

import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Triton decides interpreter-or-compiler when a kernel is decorated, i.e. when
# pilot_hpc_kernels.ctmoa is imported (at collection of the test modules, after this
# conftest). Without a GPU the interpreter is the only way to run the kernels; an
# explicit TRITON_INTERPRET from the caller is left alone. Tests skip with a reason if
# the kernels were imported before this ran (INTERPRETED is False on a CPU machine).
if "TRITON_INTERPRET" not in os.environ and not _has_cuda():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


def pytest_collect_file(parent, file_path):
    # The default python_files pattern (test_*.py) would miss benchmark_ctmoa.py, which
    # must keep its name for `python -m pilot_hpc_kernels.benchmark_ctmoa`.
    if file_path.suffix == ".py" and file_path.name.startswith("benchmark_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
