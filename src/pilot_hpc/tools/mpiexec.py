"""The one place that finds `mpiexec` (the tests, the benchmarks, parity and the local
grid runner all start MPI jobs with it)."""

from __future__ import annotations

import os
import shutil
import sys


def find_mpiexec() -> str:
    """mpiexec on PATH, else the one beside this Python (pip's mpich installs it there)."""
    exe = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(exe):
        raise RuntimeError("mpiexec not found: install the project first (make install, or pip install mpich)")
    return exe
