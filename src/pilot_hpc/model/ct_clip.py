"""CT-CLIP (paper Table 4): every MLP of the CLIP vision tower gets the connector's
treatment, trained, communicated and aggregated like the connector.

Each encoder layer's MLP (fc1 -> activation -> fc2) becomes a PilotConnector over a
copy of that MLP: stage 1 a task- and a client-specific copy with the difference loss,
stage 2 the cross-task mixture with its own per-token router. The vision tower's
attention, norms and embeddings stay frozen. CLIP's activation (quick_gelu for the
OpenAI ViT-L/14) is not the projector's GELU, so these connectors mix their MLPs in
eager PyTorch (PilotConnector.forward checks the activation), never through the fused
GELU kernel.
"""

from __future__ import annotations

from torch import nn

from pilot_hpc.config import PilotConfig
from pilot_hpc.model import families
from pilot_hpc.model.connector import PilotConnector


def _mlps(vision_tower: nn.Module):
    """Where the encoder's MLPs sit, as the tower's family knows them."""
    return families.of_vision_tower(vision_tower).vision_mlps(vision_tower)


def attach_ct_clip(vision_tower: nn.Module, num_tasks: int, own_task: int, *, pilot: PilotConfig, ctmoa_impl: str,
                   seed: int) -> list[PilotConnector]:
    """Replaces every encoder layer's MLP by a connector; returns them in layer order."""
    spec = families.of_vision_tower(vision_tower)
    connectors = []
    for i, mlp in enumerate(_mlps(vision_tower)):
        view = spec.vision_mlp_view(getattr(mlp.owner, mlp.attr), vision_tower)
        # A router seed per layer: the routers start different, like independent modules.
        conn = PilotConnector(view, num_tasks, own_task, pilot=pilot, ctmoa_impl=ctmoa_impl,
                              seed=seed + 1009 * (i + 1))
        setattr(mlp.owner, mlp.attr, conn)
        connectors.append(conn)
    return connectors


def ct_clip_counts(vision_tower: nn.Module, num_tasks: int) -> dict[str, int]:
    """Parameters CT-CLIP adds, per client: activated in stage 2 (every MLP copy that
    computes: own, T-1 foreign, T-1 cross, plus the routers; the frozen base MLP is
    replaced, so it is not counted) and communicated per round (the own task MLPs)."""
    # One copy of all MLPs: a layer's own MLP, or its task adapter once CT-CLIP is attached.
    owned = [getattr(m.owner, m.attr) for m in _mlps(vision_tower)]
    mlp = sum(p.numel() for m in owned for p in getattr(m, "task_adapter", m).parameters())
    hidden = vision_tower.config.hidden_size
    routers = len(owned) * num_tasks * hidden
    return {"mlp_copy": mlp, "activated": (2 * num_tasks - 1) * mlp + routers, "communicated": mlp}

