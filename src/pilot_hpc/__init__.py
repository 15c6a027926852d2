"""pilot_hpc: Pilot (federated multimodal instruction tuning) as an MPI batch-job suite."""

__version__ = "0.1.0"

__all__ = ["load_client"]


def __getattr__(name):
    # Lazy: `import pilot_hpc` stays cheap (no torch); load_client imports it when called.
    if name == "load_client":
        from pilot_hpc.export import load_client

        return load_client
    raise AttributeError(f"module 'pilot_hpc' has no attribute {name!r}")
