"""pilot_hpc: Pilot (federated multimodal instruction tuning) as an MPI batch-job suite."""

__version__ = "0.1.0"

# Before anything of ours imports torch: the CPU math libraries' code paths (cpumath.py).
from pilot_hpc import cpumath as _cpumath  # noqa: E402  (imports nothing of pilot_hpc, no torch)

_cpumath.apply()

__all__ = ["load_client"]


def __getattr__(name):
    # Lazy: `import pilot_hpc` stays cheap (no torch). Through importlib, because
    # pilot_hpc.export depends on modules that read pilot_hpc.__version__: a package-level
    # import statement would be a cycle in the import graph (tests/unit/test_imports.py).
    if name == "load_client":
        import importlib

        return importlib.import_module("pilot_hpc.export").load_client
    raise AttributeError(f"module 'pilot_hpc' has no attribute {name!r}")
