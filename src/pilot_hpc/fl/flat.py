"""Flattening named tensors to one contiguous buffer and back, and the wire format.

bf16 has no numpy dtype: it travels as its raw 2-byte words (an int16 view), so it
crosses ranks losslessly and at half the bytes of a float32 copy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def flatten(tensors: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """One contiguous 1-D tensor (on `device`) holding every tensor in order."""
    if not tensors:
        return torch.zeros(0, device=device)
    return torch.cat([t.detach().reshape(-1).to(device) for t in tensors])


def numel(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copies consecutive slices of `flat` into `tensors` (in place, no autograd)."""
    if flat.numel() != numel(tensors):
        raise ValueError(f"buffer has {flat.numel()} values but the tensors need {numel(tensors)}")
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
            offset += t.numel()


def to_wire(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def wire_dtype(dtype: torch.dtype) -> np.dtype:
    return to_wire(torch.zeros(1, dtype=dtype)).dtype
