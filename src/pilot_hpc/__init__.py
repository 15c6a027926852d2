"""pilot_hpc: Pilot (federated multimodal instruction tuning) as an MPI batch-job suite."""

__version__ = "0.1.0"
