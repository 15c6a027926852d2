"""pilot_hpc: federated multimodal instruction tuning (Pilot) as an MPI batch-job suite."""

import os

from setuptools import setup

# A range that a cluster's CUDA build of torch satisfies. On the CPU dev machines the
# Makefile installs torch==2.13.0 first (a wheel on disk); with it present this range
# pulls nothing more, while an open range alone would download a multi-GB CUDA build.
TORCH_SPEC = os.environ.get("PILOT_HPC_TORCH_SPEC", "torch>=2.4,<2.15")

setup(
    name="pilot_hpc",
    version="0.1.0",
    description="Pilot (federated multimodal instruction tuning of LLaVA) on HPC clusters: MPI, Slurm, HDF5, Triton",
    python_requires=">=3.10",
    # The Triton kernels are their own package, a leaf that imports nothing of pilot_hpc;
    # their tests and benchmark smoke live in kernels/ (`pytest kernels/`).
    package_dir={"": "src"},
    packages=[
        "pilot_hpc",
        "pilot_hpc.data",
        "pilot_hpc.model",
        "pilot_hpc.fl",
        "pilot_hpc.fl.strategies",
        "pilot_hpc.train",
        "pilot_hpc.metrics",
        "pilot_hpc.checkpoint",
        "pilot_hpc.tools",
        "pilot_hpc_kernels",
    ],
    install_requires=[
        TORCH_SPEC,
        "transformers>=4.57",
        "peft>=0.17",
        "triton>=3.0",
        "mpi4py>=4.0",
        "mpich>=4.2",
        "h5py>=3.10",
        "datasets>=3.0",
        "pycocoevalcap>=1.2",
        "submitit>=1.5",
        "PyYAML>=6.0",
        "matplotlib>=3.8",
        "tensorboard>=2.14",
        "tokenizers>=0.20",
        "Pillow>=10.0",
        "numpy>=1.26",
        "scipy>=1.11",  # Student's t for the study's intervals and tests (tools/stats.py)
        "dp-accounting>=0.4",  # privacy accounting of the DP mechanisms
        "cryptography>=42",  # X25519 key agreement and HKDF for secure aggregation's pairwise masks
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.15"],
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "pytest-benchmark>=4.0", "pytest-xdist>=3.5"],
    },
    entry_points={"console_scripts": ["pilot-hpc=pilot_hpc.main:cli"]},
)
