"""Tests of the fused CT-MoA kernels (pilot_hpc_kernels) and their benchmark: `pytest kernels/`."""
