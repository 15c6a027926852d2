"""The MPI exchange under a real `mpiexec -n 3`, started as a subprocess with a timeout."""

import os
import subprocess
import sys

from helpers import REPO, mpiexec


def test_buffer_collectives_under_mpiexec():
    script = os.path.join(REPO, "tests", "mpi_exchange_check.py")
    proc = subprocess.run([mpiexec(), "-n", "3", sys.executable, script], capture_output=True, text=True,
                          timeout=180, env=dict(os.environ, MPIEXEC_TIMEOUT="150"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(line for line in proc.stdout.splitlines() if line.endswith(": ok")) == \
        ["rank 0: ok", "rank 1: ok", "rank 2: ok"]
