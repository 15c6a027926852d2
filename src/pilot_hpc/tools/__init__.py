"""Developer tools, each runnable as `python -m pilot_hpc.tools.<name>`: bench, bench_mpi, parity, dryrun."""
