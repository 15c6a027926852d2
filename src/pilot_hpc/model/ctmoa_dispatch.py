"""One switch that picks the CT-MoA implementation (fused Triton kernels or the reference).

    impl="auto"       Triton when the kernels can run this call, else the PyTorch reference
                      with the reason logged once: h, the router and every adapter weight
                      must share one dtype among float32/float16/bfloat16 and be on a
                      CUDA device whose compute capability the kernels support (bf16
                      needs sm_80+ for its MMA; Triton itself needs sm_75+), and the
                      kernels must import (a machine without triton falls back).
    impl="triton"     the fused kernels, or a RuntimeError saying why they cannot run.
    impl="reference"  `pilot_hpc.model.ctmoa.ctmoa_reference`.

Everything `auto` checks is decided before any launch, from dtypes, devices and the
device's capability: a call that the kernels would reject (float64, mixed dtypes) or
that a GPU could not run never fails at launch.

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

from pilot_hpc.config import ConfigError
from pilot_hpc.model.ctmoa import AdapterWeights, CTMoAOutput, ctmoa_reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Lowest compute capability per dtype: bf16 tl.dot lowers to the sm_80 MMA; Triton 3.x
# generates code for sm_75 and newer.
MIN_CAPABILITY = {torch.bfloat16: (8, 0), torch.float16: (7, 5), torch.float32: (7, 5)}

ENV_VAR = "PILOT_HPC_CTMOA"
IMPLS = ("auto", "triton", "reference")
logger = logging.getLogger("pilot_hpc.ctmoa")

_logged_paths: set[tuple[str, str]] = set()
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


def _tensors(h, router_weight, adapters) -> list[torch.Tensor]:
    out = [h] + ([router_weight] if router_weight is not None else [])
    return out + [x for a in adapters for x in a if x is not None]


def capability_reason(dtype: torch.dtype, capability: tuple[int, int]) -> str | None:
    """Why a device of this compute capability cannot run the kernels in `dtype` (None: it can)."""
    need = MIN_CAPABILITY[dtype]
    if tuple(capability) < need:
        return (f"{str(dtype).replace('torch.', '')} needs compute capability {need[0]}.{need[1]}+, the device has "
                f"{capability[0]}.{capability[1]}")
    return None


def fallback_reason(h: torch.Tensor, router_weight: torch.Tensor | None = None,
                    adapters: Sequence[AdapterWeights] = ()) -> str | None:
    """Why `auto` must not take the Triton path for these inputs (None: it may).

    Dtypes first (so a CPU run reports a float64 input as such), then devices, then the
    GPU's compute capability."""
    tensors = _tensors(h, router_weight, adapters)
    dtypes = sorted({str(x.dtype).replace("torch.", "") for x in tensors})
    if len(dtypes) > 1:
        return f"mixed dtypes {dtypes} (the kernels need h, router and adapters in one dtype)"
    if h.dtype not in KERNEL_DTYPES:
        return f"dtype {dtypes[0]} (the kernels take float32, float16, bfloat16)"
    devices = sorted({str(x.device) for x in tensors})
    if not h.is_cuda or len(devices) > 1:
        return f"h on {h.device.type}" if len(devices) == 1 else f"tensors on {devices}"
    return capability_reason(h.dtype, torch.cuda.get_device_capability(h.device))


def resolve_impl(h: torch.Tensor, impl: str = "auto", router_weight: torch.Tensor | None = None,
                 adapters: Sequence[AdapterWeights] = ()) -> tuple[str, str]:
    """(path, reason): the implementation a call with these inputs and `impl` takes."""
    env = os.environ.get(ENV_VAR, "").strip().lower()
    requested, source = (env, f"{ENV_VAR}={env}") if env else (impl, f"impl={impl!r}")
    if requested not in IMPLS:
        raise ConfigError(f"CT-MoA implementation must be one of {IMPLS}, got {requested!r} ({source}): set "
                          f"model.ctmoa_impl or {ENV_VAR} to one of them")
    if requested == "reference":
        return "reference", source
    if requested == "auto":
        reason = fallback_reason(h, router_weight, adapters)
        if reason is not None:
            return "reference", f"{source}, {reason}"
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
    # Once per path and reason: a run that falls back for a new reason says so once.
    # Not while Dynamo traces: a logging call there is a graph break (fullgraph=True
    # fails); the path of a compiled call is fixed at trace time and logged by any eager call.
    if torch.compiler.is_compiling():
        return
    if (path, reason) not in _logged_paths:
        _logged_paths.add((path, reason))
        logger.info("CT-MoA implementation: %s (%s)", path, reason)


def ctmoa(
    h: torch.Tensor,
    router_weight: torch.Tensor,
    adapters: Sequence[AdapterWeights],
    expert_of: Sequence[int],
    impl: str = "auto",
) -> CTMoAOutput:
    """CT-MoA forward through the selected implementation (same contract as ctmoa_reference)."""
    path, reason = resolve_impl(h, impl, router_weight, adapters)
    _log_once(path, reason)
    if path == "triton":
        return _kernels.ctmoa_triton(h, router_weight, adapters, expert_of)
    return ctmoa_reference(h, router_weight, adapters, expert_of)
