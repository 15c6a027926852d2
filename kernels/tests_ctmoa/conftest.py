"""pytest setup for the kernel tests: Triton's interpreter on CPU-only machines.

These tests sit in a package (`tests_ctmoa`) inside kernels/, and kernels/ itself is no
package: a folder named `kernels` on sys.path (the repository root is, under `python -m`)
would shadow the PyPI project of that name, which transformers imports. The folder's name
starts with `test` so that pytest loads this file at start-up (it does so for the `test*`
folders of each path it is given), before any test module imports the kernels."""

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
