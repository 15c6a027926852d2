"""The MPI exchange under a real `mpiexec -n 3`, started as a subprocess with a timeout."""

from helpers import run_mpi_check


def test_buffer_collectives_under_mpiexec():
    run_mpi_check("mpi_exchange_check.py", 3, timeout=150)
