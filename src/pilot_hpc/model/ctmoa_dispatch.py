"""One switch that picks the CT-MoA implementation (fused Triton kernels or the reference).

    impl="auto"       Triton when h is on a CUDA device and the kernels import, else the
                      PyTorch reference (CPU runs, machines without triton).
    impl="triton"     the fused kernels, or a RuntimeError saying why they cannot run.
    impl="reference"  `pilot_hpc.model.ctmoa.ctmoa_reference`.

The environment variable PILOT_HPC_CTMOA=auto|triton|reference overrides the argument
(one switch for a whole Slurm job without touching configs). The path taken is logged
once per path on the logger "pilot_hpc.ctmoa".

triton is imported only by `pilot_hpc_kernels.ctmoa`, and only when the Triton path is
wanted: a CPU-only run never pays for (or depends on) the import.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Sequence

import torch

from pilot_hpc.model.ctmoa import AdapterWeights, CTMoAOutput, ctmoa_reference

ENV_VAR = "PILOT_HPC_CTMOA"
IMPLS = ("auto", "triton", "reference")
logger = logging.getLogger("pilot_hpc.ctmoa")

_logged_paths: set[str] = set()
_kernels: ModuleType | None = None
_kernels_error: str | None = None


def _load_kernels() -> ModuleType | None:
    """The Triton kernels module, or None (reason in _kernels_error) when it cannot import."""
    global _kernels, _kernels_error
    if _kernels is None and _kernels_error is None:
        try:
            from pilot_hpc_kernels import ctmoa as kernels
        except ImportError as exc:  # no triton (or no kernels package) on this machine
            _kernels_error = f"{type(exc).__name__}: {exc}"
        else:
            _kernels = kernels
    return _kernels


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_impl(h: torch.Tensor, impl: str = "auto") -> tuple[str, str]:
    """(path, reason): the implementation a call with this `h` and `impl` takes."""
    env = os.environ.get(ENV_VAR, "").strip().lower()
    requested, source = (env, f"{ENV_VAR}={env}") if env else (impl, f"impl={impl!r}")
    if requested not in IMPLS:
        raise ValueError(f"CT-MoA implementation must be one of {IMPLS}, got {requested!r} ({source})")
    if requested == "reference":
        return "reference", source
    if requested == "auto":
        if not h.is_cuda:
            return "reference", f"{source}, h on {h.device.type}"
        if _load_kernels() is None:
            return "reference", f"{source}, Triton kernels unavailable ({_kernels_error})"
        return "triton", f"{source}, h on {h.device}"
    # Forced Triton: fail loudly rather than fall back silently.
    if not h.is_cuda and not _interpreter_requested():
        raise RuntimeError(f"CT-MoA: Triton was forced ({source}) but h is on {h.device.type}; the Triton kernels run "
                           "on CPU tensors only in Triton's interpreter (set TRITON_INTERPRET=1 before the first "
                           "import of triton), otherwise use a CUDA device or impl='reference'")
    if _load_kernels() is None:
        raise RuntimeError(f"CT-MoA: Triton was forced ({source}) but the kernels cannot be imported: "
                           f"{_kernels_error}")
    return "triton", source


def _log_once(path: str, reason: str) -> None:
    if path not in _logged_paths:
        _logged_paths.add(path)
        logger.info("CT-MoA implementation: %s (%s)", path, reason)


def ctmoa(
    h: torch.Tensor,
    router_weight: torch.Tensor,
    adapters: Sequence[AdapterWeights],
    expert_of: Sequence[int],
    impl: str = "auto",
) -> CTMoAOutput:
    """CT-MoA forward through the selected implementation (same contract as ctmoa_reference)."""
    path, reason = resolve_impl(h, impl)
    _log_once(path, reason)
    if path == "triton":
        return _kernels.ctmoa_triton(h, router_weight, adapters, expert_of)
    return ctmoa_reference(h, router_weight, adapters, expert_of)
