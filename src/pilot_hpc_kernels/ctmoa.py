"""Fused Triton CT-MoA: router + mixture of the 2T-1 adapter MLPs, forward and backward.

The math is `pilot_hpc_kernels.ctmoa_reference.ctmoa_reference` (read it first); the
kernels and their launchers are in `ctmoa_fwd` and `ctmoa_bwd`. This module registers
them with PyTorch and holds the public entry point `ctmoa_triton`.

Registration: two `torch.library` custom ops, `pilot_hpc_kernels::ctmoa_fwd` and
`pilot_hpc_kernels::ctmoa_bwd`, each with a fake (meta) implementation that gives only
shapes and dtypes. Dynamo and AOTAutograd therefore never trace into the Triton code:
`torch.compile(fullgraph=True)` over a module calling `ctmoa_triton` sees two opaque
ops. The forward's autograd formula is the backward op; the backward op's own autograd
formula raises, which is `once_differentiable` (a clear error on double backward,
not a silently detached gradient).

What the forward keeps is decided from requires_grad when it runs (with autograd on):
  visit[m]:  MLP m has a trainable weight, or H needs a grad: its Z_m [M, C] is kept,
             and the backward runs its GEMMs (D, dW2, dW1) from it, recomputing nothing.
  keep_y[m]: MLP m is frozen but the router (or H) needs dP: its output Y_m [M, C] is
             kept in the compute dtype, and its dP term is an element-wise product.
Under no_grad (or with nothing trainable) nothing is kept for a backward. The adapters' weights are
passed as they are (lists of tensors into the op, a tuple of pointers into the kernels):
no call stacks or copies a weight.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pilot_hpc_kernels.ctmoa_bwd import mixture_backward
from pilot_hpc_kernels.ctmoa_fwd import INTERPRETED, mixture_forward, router_forward
from pilot_hpc_kernels.ctmoa_reference import AdapterWeights, CTMoAOutput, RouterStats, ctmoa_reference

__all__ = ["INTERPRETED", "check_inputs", "ctmoa_triton", "save_plan"]

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- forward op
def _bias_in(biases, like: Tensor) -> list[Tensor]:
    # A list holding None is one opaque leaf to torch.library's autograd (a Tensor?[]
    # argument gets no gradient at all, even for its tensors), so a missing bias travels
    # as an empty tensor and the op's list stays a differentiable Tensor[].
    return [b if b is not None else like.new_empty(0) for b in biases]


def _bias_out(biases: Sequence[Tensor]) -> list[Tensor | None]:
    return [b if b.numel() else None for b in biases]


@torch.library.custom_op("pilot_hpc_kernels::ctmoa_fwd", mutates_args=())
def ctmoa_fwd(h2: Tensor, wr: Tensor, w1: list[Tensor], b1: list[Tensor], w2: list[Tensor], b2: list[Tensor],
              expert_of: list[int], visit: list[bool],
              keep_y: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out [M, N], probs [M, T], counts [T], prob_sum [T], lse_sq_sum [], lse [M],
    Z [M, n_visit*C], Y [n_keep, M, N]); the last three are for the backward only.
    A missing bias is an empty tensor (see `_bias_in`)."""
    probs, lse, counts, prob_sum, lse_sq = router_forward(h2, wr)
    out, z, y = mixture_forward(h2, probs, w1, _bias_out(b1), w2, _bias_out(b2), expert_of, visit, keep_y)
    return out, probs, counts, prob_sum, lse_sq, lse, z, y


@ctmoa_fwd.register_fake
def _ctmoa_fwd_fake(h2, wr, w1, b1, w2, b2, expert_of, visit, keep_y):
    m, t, c, n = h2.shape[0], wr.shape[0], w1[0].shape[0], w2[0].shape[0]
    f32 = torch.float32
    return (h2.new_empty(m, n), h2.new_empty(m, t, dtype=f32), h2.new_empty(t, dtype=f32),
            h2.new_empty(t, dtype=f32), h2.new_empty((), dtype=f32), h2.new_empty(m, dtype=f32),
            h2.new_empty(m, sum(visit) * c), h2.new_empty(sum(keep_y), m, n))


# ----------------------------------------------------------------------------- backward op
@torch.library.custom_op("pilot_hpc_kernels::ctmoa_bwd", mutates_args=())
def ctmoa_bwd(g_out: Tensor, g_probs: Optional[Tensor], g_prob_sum: Optional[Tensor], g_lse_sq: Optional[Tensor],
              h2: Tensor, wr: Tensor, w1: list[Tensor], b1: list[Tensor], w2: list[Tensor], b2: list[Tensor], probs: Tensor, lse: Tensor, z: Tensor, y: Tensor, expert_of: list[int],
              visit: list[bool], keep_y: list[bool], needs: list[bool]) -> list[Tensor]:
    """[d_h, d_wr, (dw1, db1, dw2, db2) per MLP]; an empty tensor where needs[i] is False
    (an op cannot return None)."""
    grads = mixture_backward(g_out, g_probs, g_prob_sum, g_lse_sq, h2, wr, w1, _bias_out(b1), w2, _bias_out(b2), probs, lse, z, y,
                             expert_of, visit, keep_y, needs)
    return [x if x is not None else h2.new_empty(0) for x in grads]


def _grad_shapes(h2, wr, w1, b1, w2, b2):
    shapes = [(h2.shape, h2.dtype), (wr.shape, wr.dtype)]
    for a in zip(w1, b1, w2, b2):
        shapes += [(x.shape, x.dtype) for x in a]
    return shapes


@ctmoa_bwd.register_fake
def _ctmoa_bwd_fake(g_out, g_probs, g_prob_sum, g_lse_sq, h2, wr, w1, b1, w2, b2, probs, lse, z, y, expert_of,
                    visit, keep_y, needs):
    return [h2.new_empty(shape, dtype=dtype) if need else h2.new_empty(0)
            for need, (shape, dtype) in zip(needs, _grad_shapes(h2, wr, w1, b1, w2, b2))]


def _no_double_backward(ctx, *grads):
    raise RuntimeError("CT-MoA: the fused Triton backward is not differentiable (once_differentiable): a double "
                       "backward (create_graph=True, then a gradient of the gradients) needs the reference path, "
                       "impl='reference' or PILOT_HPC_CTMOA=reference")


torch.library.register_autograd("pilot_hpc_kernels::ctmoa_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    h2, wr, w1, b1, w2, b2, expert_of, visit, keep_y = inputs
    _, probs, _, _, _, lse, z, y = output
    e = len(w1)
    ctx.num_mlps = len(w1)
    ctx.static = (list(expert_of), list(visit), list(keep_y))
    needs = [h2.requires_grad, wr.requires_grad]
    for a in zip(w1, b1, w2, b2):
        needs += [x.requires_grad for x in a]
    ctx.needs = needs
    ctx.save_for_backward(h2, wr, probs, lse, z, y, *w1, *b1, *w2, *b2)


def _backward(ctx, g_out, g_probs, _g_counts, g_prob_sum, g_lse_sq, _g_lse, _g_z, _g_y):
    e = ctx.num_mlps
    saved = ctx.saved_tensors
    h2, wr, probs, lse, z, y = saved[:6]
    w1, b1, w2, b2 = (list(saved[6 + k * e:6 + (k + 1) * e]) for k in range(4))
    expert_of, visit, keep_y = ctx.static
    if g_out is None:  # only the aux statistics reached the loss
        g_out = torch.zeros(h2.shape[0], w2[0].shape[0], dtype=h2.dtype, device=h2.device)
    grads = ctmoa_bwd(g_out, g_probs, g_prob_sum, g_lse_sq, h2, wr, w1, b1, w2, b2, probs, lse, z, y, expert_of,
                      visit, keep_y, ctx.needs)
    grads = [x if need else None for x, need in zip(grads, ctx.needs)]
    per = [grads[2 + 4 * i:6 + 4 * i] for i in range(e)]
    return (grads[0], grads[1], [p[0] for p in per], [p[1] for p in per], [p[2] for p in per],
            [p[3] for p in per], None, None, None)


torch.library.register_autograd("pilot_hpc_kernels::ctmoa_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(h, router_weight, adapters, expert_of) -> None:
    """ValueError naming the bad shape/dtype/device (the kernels assume all of this)."""
    if h.dim() < 1 or h.dtype not in _DTYPES:
        raise ValueError(f"CT-MoA: h must be a float32/float16/bfloat16 tensor [..., Cv], got {h.dtype} "
                         f"{tuple(h.shape)}")
    cv = h.shape[-1]
    if router_weight.dim() != 2 or router_weight.shape[1] != cv or router_weight.shape[0] < 1:
        raise ValueError(f"CT-MoA: router weight must be [T, Cv={cv}], got {tuple(router_weight.shape)}")
    if router_weight.dtype not in _DTYPES or router_weight.device != h.device:
        raise ValueError(f"CT-MoA: router weight is {router_weight.dtype} on {router_weight.device}, "
                         f"h is on {h.device}")
    if len(adapters) != len(expert_of) or not adapters:
        raise ValueError(f"CT-MoA: {len(adapters)} adapters but {len(expert_of)} expert indices")
    num_experts = router_weight.shape[0]
    if max(expert_of) >= num_experts or min(expert_of) < 0:
        raise ValueError(f"CT-MoA: expert index out of range for a router with {num_experts} experts: "
                         f"{list(expert_of)}")
    c = adapters[0].w1.shape[0] if adapters[0].w1.dim() == 2 else -1
    n = adapters[0].w2.shape[0] if adapters[0].w2 is not None and adapters[0].w2.dim() == 2 else -1
    # [C, Cv], [C], [N, C], [N]: N (the output width) may differ from C (Qwen-VL's merger MLP)
    expected = {"w1": (c, cv), "b1": (c,), "w2": (n, c), "b2": (n,)}
    for i, a in enumerate(adapters):
        for name, x in zip(("w1", "b1", "w2", "b2"), a):
            if x is None:
                if name in ("w1", "w2"):
                    raise ValueError(f"CT-MoA: adapter {i} has no {name}")
                continue
            if tuple(x.shape) != expected[name]:
                raise ValueError(f"CT-MoA: adapter {i} {name} has shape {tuple(x.shape)}, expected {expected[name]}")
            if x.dtype != h.dtype or x.device != h.device:
                raise ValueError(f"CT-MoA: adapter {i} {name} is {x.dtype} on {x.device}; h is {h.dtype} on "
                                 f"{h.device} (the adapters must match h)")


def save_plan(h, router_weight, adapters: Sequence[AdapterWeights]) -> tuple[list[bool], list[bool]]:
    """(visit, keep_y) per MLP, from requires_grad and the grad mode (module docstring)."""
    train = [h.requires_grad or any(x is not None and x.requires_grad for x in a) for a in adapters]
    need_dp = h.requires_grad or router_weight.requires_grad
    # keep_y also picks how the forward sums (P_e Y_m in the epilogue instead of inside
    # the K loop): it ignores the grad mode so that a no_grad forward gives the training
    # forward's output bit for bit; under no_grad Y is a temporary, dropped on return.
    keep_y = [need_dp and not tr for tr in train]
    visit = train if torch.is_grad_enabled() else [False] * len(adapters)
    return visit, keep_y


def ctmoa_triton(h: torch.Tensor, router_weight: torch.Tensor, adapters: Sequence[AdapterWeights],
                 expert_of: Sequence[int]) -> CTMoAOutput:
    """Fused CT-MoA with the contract of `ctmoa_reference` (h: [..., Cv] -> out [..., C])."""
    check_inputs(h, router_weight, adapters, expert_of)
    if not h.is_cuda and not INTERPRETED:
        raise RuntimeError("CT-MoA Triton kernels got CPU tensors: they run on CPU only in Triton's interpreter, "
                           "i.e. with TRITON_INTERPRET=1 set before triton/pilot_hpc_kernels are imported")
    lead, cv, t = h.shape[:-1], h.shape[-1], router_weight.shape[0]
    h2 = h.reshape(-1, cv)  # [M, Cv]
    if h2.shape[0] == 0:  # no tokens: nothing to launch, the reference gives the empty result
        return ctmoa_reference(h, router_weight, adapters, expert_of)
    visit, keep_y = save_plan(h2, router_weight, adapters)
    out, probs, counts, prob_sum, lse_sq, _, _, _ = ctmoa_fwd(
        h2, router_weight, [a.w1 for a in adapters], _bias_in([a.b1 for a in adapters], h2),
        [a.w2 for a in adapters], _bias_in([a.b2 for a in adapters], h2), [int(e) for e in expert_of], visit, keep_y)
    stats = RouterStats(counts=counts.detach(), prob_sum=prob_sum, lse_sq_sum=lse_sq, num_tokens=h2.shape[0])
    return CTMoAOutput(out=out.reshape(*lead, out.shape[1]), probs=probs.reshape(*lead, t), stats=stats)
