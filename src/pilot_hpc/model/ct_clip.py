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
from pilot_hpc.model.connector import PilotConnector


class MLPAdapter(nn.Module):
    """A CLIP MLP in the projector's layout (linear_1, act, linear_2), so that the
    connector's code (adapter copies, adapter_weights, stages) applies unchanged."""

    def __init__(self, mlp: nn.Module, activation_name: str):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = mlp.fc1, mlp.activation_fn, mlp.fc2
        self.activation_name = activation_name

    def forward(self, x):  # x: [B, N, C]
        return self.linear_2(self.act(self.linear_1(x)))


def _layers(vision_tower: nn.Module):
    # transformers 5 keeps the encoder on the vision model itself; 4.x under .vision_model.
    return getattr(vision_tower, "vision_model", vision_tower).encoder.layers


def attach_ct_clip(vision_tower: nn.Module, num_tasks: int, own_task: int, *, pilot: PilotConfig, ctmoa_impl: str,
                   seed: int) -> list[PilotConnector]:
    """Replaces every encoder layer's MLP by a connector; returns them in layer order."""
    act = vision_tower.config.hidden_act
    connectors = []
    for i, layer in enumerate(_layers(vision_tower)):
        # A router seed per layer: the routers start different, like independent modules.
        conn = PilotConnector(MLPAdapter(layer.mlp, act), num_tasks, own_task, pilot=pilot, ctmoa_impl=ctmoa_impl,
                              seed=seed + 1009 * (i + 1))
        layer.mlp = conn
        connectors.append(conn)
    return connectors


def ct_clip_counts(vision_tower: nn.Module, num_tasks: int) -> dict[str, int]:
    """Parameters CT-CLIP adds, per client: activated in stage 2 (every MLP copy that
    computes: own, T-1 foreign, T-1 cross, plus the routers; the frozen base MLP is
    replaced, so it is not counted) and communicated per round (the own task MLPs)."""
    layers = _layers(vision_tower)
    # One copy of all MLPs: a layer's own MLP, or its task adapter once CT-CLIP is attached.
    mlp = sum(p.numel() for layer in layers for p in getattr(layer.mlp, "task_adapter", layer.mlp).parameters())
    hidden = vision_tower.config.hidden_size
    routers = len(layers) * num_tasks * hidden
    return {"mlp_copy": mlp, "activated": (2 * num_tasks - 1) * mlp + routers, "communicated": mlp}
