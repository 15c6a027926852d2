"""Secure aggregation's exchange (fl/secagg.py) under a real `mpiexec -n 3` world, against
the exact and the plain weighted sums (secagg_check.py lists the cases)."""

from helpers import run_mpi_check


def test_secure_sum_equals_the_weighted_sum_and_rank_0_sees_only_uniform_words():
    """Chunked and whole rows, bf16, an empty shared part, a client excluded for a
    non-finite update and one beyond the ring's range, clients that sit out (the last
    rank sends no update bytes), a server without clients, FedAdam's step over two
    rounds; bitwise equal with W = 1; chi-square and KS uniformity of the received rows."""
    run_mpi_check("secagg_check.py", 3)
