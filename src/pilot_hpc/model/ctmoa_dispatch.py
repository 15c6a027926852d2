"""One switch that picks the CT-MoA implementation (fused Triton kernel or the reference).

The Triton path (issue 3) plugs in here; until then every call goes to the reference.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pilot_hpc.model.ctmoa import AdapterWeights, CTMoAOutput, ctmoa_reference


def ctmoa(
    h: torch.Tensor,
    router_weight: torch.Tensor,
    adapters: Sequence[AdapterWeights],
    expert_of: Sequence[int],
    impl: str = "auto",
) -> CTMoAOutput:
    """CT-MoA forward through the selected implementation (same contract as ctmoa_reference)."""
    return ctmoa_reference(h, router_weight, adapters, expert_of)
