"""Cross-task mixture of adapters (CT-MoA): the PyTorch reference of the math.

This module is the written definition that the fused Triton kernels
(`pilot_hpc_kernels.ctmoa`) must match; the method itself (stage 2 of the training)
is described in docs/method.md. It imports only torch, never triton, so a CPU machine
without triton uses it as is. Per visual token h (a row of H, width Cv):

    c = h W_r^T                        # [T] router logits, bias-free
    P = softmax(c)                     # [T]
    x = sum_m P[expert_of[m]] * MLP_m(h),   MLP_m(h) = W2_m gelu(W1_m h + b1_m) + b2_m

with the 2T-1 MLPs ordered psi_1, psi_2, psi_c_2, ..., psi_T, psi_c_T, so that
expert_of = [0, 1, 1, 2, 2, ...]: expert 1 (index 0) is the client's own task
adapter; expert i >= 2 is the foreign task adapter psi_i plus its cross-task adapter
psi_c_i.

The router statistics are returned next to the output so that the auxiliary losses
(load balancing L_b and router z-loss L_z) need no second pass over H:
    counts[i]   = number of tokens whose argmax expert is i   (no gradient)
    prob_sum[i] = sum over tokens of P_i                       (differentiable)
    lse_sq_sum  = sum over tokens of (logsumexp_i c_i)^2       (differentiable)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


class AdapterWeights(NamedTuple):
    """One two-layer MLP in nn.Linear layout (weight is [out, in])."""

    w1: torch.Tensor  # [C, Cv]
    b1: torch.Tensor | None  # [C]
    w2: torch.Tensor  # [C, C]
    b2: torch.Tensor | None  # [C]


@dataclass
class RouterStats:
    counts: torch.Tensor  # [T] float32, argmax counts (no grad)
    prob_sum: torch.Tensor  # [T] float32, sum of router probabilities
    lse_sq_sum: torch.Tensor  # [] float32, sum of logsumexp(c)^2
    num_tokens: int


@dataclass
class CTMoAOutput:
    out: torch.Tensor  # [..., C] in the input dtype
    probs: torch.Tensor  # [..., T] float32
    stats: RouterStats


def mlp_expert_index(num_tasks: int) -> list[int]:
    """Router expert of each of the 2T-1 MLPs: [0, 1, 1, 2, 2, ...]."""
    return [0] + [i for i in range(1, num_tasks) for _ in (0, 1)]


def router_reference(h: torch.Tensor, router_weight: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
    """Per-token softmax router and the statistics the auxiliary losses need.

    h: [..., Cv]; router_weight: [T, Cv]. Returns probs [..., T] (float32).
    """
    logits = F.linear(h.float(), router_weight.float())  # [..., T]
    probs = logits.softmax(dim=-1)
    flat_probs = probs.reshape(-1, probs.shape[-1])  # [M, T]
    lse = torch.logsumexp(logits, dim=-1).reshape(-1)  # [M]
    counts = torch.bincount(flat_probs.detach().argmax(dim=-1), minlength=probs.shape[-1]).float()
    stats = RouterStats(
        counts=counts,
        prob_sum=flat_probs.sum(dim=0),
        lse_sq_sum=(lse * lse).sum(),
        num_tokens=flat_probs.shape[0],
    )
    return probs, stats


def adapter_forward(h: torch.Tensor, w: AdapterWeights) -> torch.Tensor:
    """The connector MLP: Linear(Cv, C) -> GELU (exact, erf) -> Linear(C, N) (N = C in
    LLaVA's projector; Qwen-VL's merger MLP has N < C)."""
    return F.linear(F.gelu(F.linear(h, w.w1, w.b1)), w.w2, w.b2)


def ctmoa_reference(
    h: torch.Tensor,
    router_weight: torch.Tensor,
    adapters: Sequence[AdapterWeights],
    expert_of: Sequence[int],
) -> CTMoAOutput:
    """CT-MoA forward in eager PyTorch (autograd gives the backward).

    h: [..., Cv] visual tokens; router_weight: [T, Cv]; adapters: the 2T-1 MLPs in
    the order of `mlp_expert_index(T)`; expert_of[m] is the router expert of MLP m.
    The mixture is accumulated in float32 and cast back to h's dtype.
    """
    if len(adapters) != len(expert_of):
        raise ValueError(f"CT-MoA: {len(adapters)} adapters but {len(expert_of)} expert indices")
    num_experts = router_weight.shape[0]
    if max(expert_of) >= num_experts or min(expert_of) < 0:
        raise ValueError(f"CT-MoA: expert index out of range for a router with {num_experts} experts: {list(expert_of)}")
    probs, stats = router_reference(h, router_weight)
    out = None
    for w, e in zip(adapters, expert_of):
        term = probs[..., e : e + 1] * adapter_forward(h, w).float()  # [..., N]
        out = term if out is None else out + term
    return CTMoAOutput(out=out.to(h.dtype), probs=probs, stats=stats)


def load_balance_loss(stats: RouterStats) -> torch.Tensor:
    """Switch-style L_b = T * sum_i D_i * R_i (D: argmax fraction, R: mean probability)."""
    n = max(stats.num_tokens, 1)
    num_experts = stats.counts.shape[0]
    return num_experts * torch.sum((stats.counts / n) * (stats.prob_sum / n))


def z_loss(stats: RouterStats) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(c)^2."""
    return stats.lse_sq_sum / max(stats.num_tokens, 1)
