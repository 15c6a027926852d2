"""FedDPA (Yang et al. 2024, "Dual-Personalizing Adapter for Federated Foundation
Models"): every client holds two LoRA adapters on the same LLM layers, a *global* one,
aggregated across clients with sample-weighted FedAvg, and a *local* one, trained on
the client and never sent. Both are active in every forward pass:

    h = W0 x + (1 - a) * B_g A_g x * s + a * B_l A_l x * s,    s = lora_alpha / r,

with a = feddpa.local_weight (default 0.5).

Variant implemented: the fixed-weight one (the paper's FedDPA-F). The mix is folded
into peft's per-adapter `scaling` (s * (1 - a) for the global adapter, s * a for the
local one), so no layer is wrapped or patched; a = 0 leaves the local adapter without
effect (and without gradient), a = 1 the global one.

Not implemented:
- the instance-wise weighting of the release (FedDPA-T: at test time the weight of each
  input comes from the cosine similarity of its representation to the client's local
  training instructions). It needs the clients' training representations at evaluation
  time, a hook the evaluation path does not have; a fixed weight is the documented
  variant (docs/method.md allows either).
- the release's two local passes per round (first the local adapter with the global one
  frozen, then the global adapter). Here both adapters are trained jointly by the one
  optimiser in the one local pass (stage PLAIN), so FedDPA gets the same local step
  budget as the other baselines.

The projector (connector psi_t) is aggregated with FedAvg, as in the FedIT baselines
FedAvg / FedProx / FedAdam (inherited from FedAvg). FedDPA's original work has no
projector: its personalisation lives in the LLM's local adapter. Sending the projector
like FedAvg makes the local LoRA the only difference from FedAvg, so the comparison
measures FedDPA's contribution; keeping the projector on the client (as Shepherd does)
would add a second, unrelated personalisation.

The server side (aggregation, install) is FedAvg's unchanged: `personal_params` is the
global adapter only, so the local adapter never enters the exchange. The local adapter
is in `PilotModel.get_state()` (every "lora_" parameter is), hence part of each client's
personal state: swapped with the client when a rank hosts several, and checkpointed.
"""

from __future__ import annotations

import copy

import torch
from peft.tuners.lora import LoraLayer

from pilot_hpc.fl.strategies.base import register
from pilot_hpc.fl.strategies.fedavg import FedAvgClient, FedAvgServer

GLOBAL = "default"  # the adapter get_peft_model made (attach_pilot): sent and aggregated
LOCAL = "local"  # added by prepare_model: never leaves the client


def set_mix(peft_model, weights: dict[str, float]) -> int:
    """Scale each named adapter's LoRA output by its weight on top of alpha / r, in every
    LoRA layer; returns the number of layers changed."""
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        for name, w in weights.items():
            layer.set_scale(name, w)
    return len(layers)


class FedDPAClient(FedAvgClient):
    def prepare_model(self, pm) -> None:
        a = self.cfg.feddpa.local_weight
        config = copy.deepcopy(pm.model.peft_config[GLOBAL])
        # Seeded, so every rank builds the same local adapter (results must not depend on
        # the world size), with a seed other than the global adapter's (attach_pilot seeds
        # run.seed) so the two A matrices differ: with equal A and a = 0.5 both adapters
        # would get equal gradients and move in lock-step. fork_rng leaves the global RNG
        # stream as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.run.seed + 1)
            pm.model.add_adapter(LOCAL, config)
        pm.model.base_model.set_adapter([GLOBAL, LOCAL])  # both active in the forward pass
        if set_mix(pm.model, {GLOBAL: 1.0 - a, LOCAL: a}) == 0:
            raise RuntimeError("feddpa: the model has no LoRA layer to mix")
        # set_adapter marks both adapters trainable: restore the current stage's flags.
        pm.set_stage(pm.connector.stage)

    def personal_params(self, pm) -> list[torch.Tensor]:
        return [p for _, p in pm.lora_named_parameters(GLOBAL)]


register("feddpa", FedDPAClient, FedAvgServer)
