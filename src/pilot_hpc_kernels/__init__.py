"""Fused Triton kernels of pilot_hpc, installed as the package `pilot_hpc_kernels`."""
