"""Checkpoints: the HDF5 file format (store.py, the only h5py importer) and the
coordination of writing and resuming across ranks (resume.py)."""

from pilot_hpc.checkpoint.store import (FORMAT, Checkpoint, CheckpointError, ClientCheckpoint, Status,
                                        append_clients, candidates, create, file_name, finalize, read, validate)

__all__ = ["FORMAT", "Checkpoint", "CheckpointError", "ClientCheckpoint", "Status", "append_clients", "candidates",
           "create", "file_name", "finalize", "read", "validate"]
