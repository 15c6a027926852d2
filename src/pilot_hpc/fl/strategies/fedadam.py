"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

Server step on the pseudo-gradient delta = mean(w_k) - w_global over the clients with a
usable update:
    m = b1 m + (1 - b1) delta
    v = b2 v + (1 - b2) delta^2
    w_global = w_global + eta * m / (sqrt(v) + tau)
As in Algorithm 2: delta^2 in v and no bias correction (Flower's FedAdam adds bias
correction; OpenFedLLM uses m^2). The mean is this project's choice, not the paper's:
by default (fedadam.weighting=samples) weighted by the clients' sample counts, as FedAvg
weights, while Algorithm 2 averages the participants' deltas unweighted
(fedadam.weighting=uniform: the plain mean of the models minus w_global, which is the
mean of the deltas when the clients started the round from w_global). Defaults (section fedadam):
eta = server_lr 1e-3, b1 0.9, b2 0.99, tau 1e-3 (> 0: a coordinate no client moved has
m = v = 0). m, v and w_global are the server state: they persist across rounds and in
checkpoints.
"""

from __future__ import annotations

import torch

from pilot_hpc.errors import CheckpointError
from pilot_hpc.fl.strategies.base import register
from pilot_hpc.fl.strategies.fedavg import FedAvgClient, FedAvgServer
from pilot_hpc.fl.update import Part


def adam_server_step(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, avg: torch.Tensor, *, lr: float,
                     beta1: float, beta2: float, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One FedAdam server step in float32 -> (w, m, v)."""
    return adam_step_on_change(w, m, v, avg.float() - w, lr=lr, beta1=beta1, beta2=beta2, tau=tau)


def adam_step_on_change(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, delta: torch.Tensor, *, lr: float,
                        beta1: float, beta2: float, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same step from the mean change `delta` itself (a lossy fl.codec mixes changes)."""
    m = beta1 * m + (1.0 - beta1) * delta
    v = beta2 * v + (1.0 - beta2) * delta * delta
    return w + lr * m / (v.sqrt() + tau), m, v


class FedAdamServer(FedAvgServer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.state: dict[str, torch.Tensor] = {}

    def weights(self, n: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
        """FedAvg's weights, or every good client weighing the same under
        fedadam.weighting=uniform (equal counts give equal weights)."""
        if self.cfg.fedadam.weighting == "uniform":
            n = torch.ones_like(n)
        return super().weights(n, good)

    def init_server(self, parts: dict[Part, torch.Tensor]) -> None:
        shared, personal = parts[Part.SHARED_BY_TASK], parts[Part.PERSONAL]
        w = torch.cat([shared.float(), personal.float()])
        self.state = {"w": w, "m": torch.zeros_like(w), "v": torch.zeros_like(w),
                      "split": torch.tensor(shared.numel())}

    def finish(self, part: Part, rows: torch.Tensor, offset: int) -> None:
        """The server step on this chunk of the FedAvg mean (every row holds it), in place.

        The state (float32, on the CPU) is updated one column chunk at a time, so the
        streamed exchange never needs the whole update at once."""
        if not self.state:
            raise RuntimeError("FedAdam: the server state was not initialised (init_server or a checkpoint)")
        if rows.numel() == 0 or not bool(torch.isfinite(rows[0]).all()):
            return  # nobody sent a usable update: the server state stays as it is
        start = offset + (int(self.state["split"]) if part is Part.PERSONAL else 0)
        cols = slice(start, start + rows.shape[1])
        a = self.cfg.fedadam
        if self.mixes_changes:
            # The mixed row is the mean change; every client adds what comes back to its round
            # start, the server's w up to the codecs' rounding, so it gets the step w_new - w.
            old = self.state["w"][cols].clone()
            w, m, v = adam_step_on_change(old, self.state["m"][cols], self.state["v"][cols], rows[0].float().cpu(),
                                          lr=a.server_lr, beta1=a.beta1, beta2=a.beta2, tau=a.tau)
            out = w - old
        else:
            w, m, v = adam_server_step(self.state["w"][cols], self.state["m"][cols], self.state["v"][cols],
                                       rows[0].float().cpu(), lr=a.server_lr, beta1=a.beta1, beta2=a.beta2, tau=a.tau)
            out = w
        self.state["w"][cols], self.state["m"][cols], self.state["v"][cols] = w, m, v
        rows.copy_(out.to(device=rows.device, dtype=rows.dtype)[None, :].expand_as(rows))

    def server_state(self) -> dict[str, torch.Tensor]:
        # Copies: finish() updates the live tensors in place.
        return {k: v.clone() for k, v in self.state.items()}

    def load_server_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = {"w", "m", "v", "split"} - set(state)
        if state and missing:
            raise CheckpointError(f"FedAdam server state lacks {sorted(missing)}")
        self.state = {k: v.clone() for k, v in state.items()}


register("fedadam", FedAvgClient, FedAdamServer)
