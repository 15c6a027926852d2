"""The fused CT-MoA as PyTorch sees it: custom ops under torch.compile and opcheck, the
double-backward error, no weight copies, and what the forward keeps for the backward.

Like test_ctmoa.py this runs the kernels in Triton's interpreter on a CPU machine
(kernels/tests_ctmoa/conftest.py), in fp32 at tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pilot_hpc_kernels.ctmoa_reference import AdapterWeights, ctmoa_reference
from .test_ctmoa import K, TOL, compare, leaves, loss_of, make_problem, needs_kernels, nerr

pytestmark = needs_kernels


def _op_args(h, wr, adapters, eo):
    h2 = h.reshape(-1, h.shape[-1])
    visit, keep_y = K.save_plan(h2, wr, adapters)
    return (h2, wr, [a.w1 for a in adapters], K._bias_in([a.b1 for a in adapters], h2), [a.w2 for a in adapters],
            K._bias_in([a.b2 for a in adapters], h2), list(eo), visit, keep_y)


class _Connector(torch.nn.Module):
    """The shape of the model's connector: router + adapters as parameters, one call."""

    def __init__(self, wr, adapters, eo):
        super().__init__()
        self.wr = torch.nn.Parameter(wr.detach().clone(), requires_grad=wr.requires_grad)
        self.mlps = torch.nn.ParameterList(
            [torch.nn.Parameter(x.detach().clone(), requires_grad=x.requires_grad) for a in adapters for x in a])
        self.eo = list(eo)

    def forward(self, h):
        p = list(self.mlps)
        adapters = [AdapterWeights(*p[i:i + 4]) for i in range(0, len(p), 4)]
        res = K.ctmoa_triton(h, self.wr, adapters, self.eo)
        return res.out, res.probs, res.stats.prob_sum, res.stats.lse_sq_sum


def test_torch_compile_fullgraph_matches_eager():
    """Dynamo sees two opaque custom ops (fake impls give the shapes): fullgraph=True
    compiles, and the compiled module gives the eager call's outputs and gradients.
    backend="aot_eager" runs AOTAutograd (the fake impls, the autograd registration)
    without inductor's C++ toolchain; the Triton kernels run the same in both."""
    h, wr, adapters, eo = make_problem((1, 19), 20, 18, 3)
    mod = _Connector(wr, adapters, eo)
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    outs = [mod(h), compiled(h)]
    weights = [torch.randn(o.shape, generator=gen) for o in outs[0]]
    params = [p for p in mod.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), params) for out in outs]
    for eager, comp in zip(outs[0], outs[1]):
        assert torch.equal(eager, comp)  # same kernels on the same inputs: bit for bit
    for eager, comp in zip(*grads):
        # the same backward op; AOTAutograd may sum the incoming gradients in another order
        assert nerr(comp, eager) <= 1e-6
    # and the eager fused call matches the reference (the definition of the math)
    ref = ctmoa_reference(h, mod.wr, [AdapterWeights(*list(mod.mlps)[i:i + 4]) for i in range(0, 20, 4)], eo)
    assert nerr(outs[1][0], ref.out) <= TOL[torch.float32]


def test_opcheck_forward_and_backward_ops():
    """torch.library.opcheck: schema, fake impl against the real one, autograd registration
    (the forward op) and the dispatch tests, for both ops."""
    h, wr, adapters, eo = make_problem((1, 5), 16, 16, 2, n=12)  # N != C: the fake impl must tell them apart
    args = _op_args(h, wr, adapters, eo)  # planned with grad on: Z of MLPs 0 and 2 kept, Y of MLP 1
    torch.library.opcheck(K.ctmoa_fwd, args)
    with torch.no_grad():
        out, probs, _, _, _, lse, z, y = K.ctmoa_fwd(*args)
    assert out.shape == (5, 12) and z.shape == (5, 32) and y.shape == (1, 5, 12)
    needs = [False, True] + [x.requires_grad for a in adapters for x in a]

    def plain(xs):
        return [x.detach() for x in xs]

    h2, wr_, w1, b1, w2, b2, eo_, visit, keep_y = args
    bargs = (torch.randn(out.shape), None, torch.ones(2), torch.ones(()), h2.detach(), wr_.detach(), plain(w1),
             plain(b1), plain(w2), plain(b2), probs, lse, z, y, eo_, visit, keep_y, needs)
    torch.library.opcheck(K.ctmoa_bwd, bargs)


def test_double_backward_raises_a_clear_error():
    h, wr, adapters, eo = make_problem((1, 9), 16, 16, 2)
    res = K.ctmoa_triton(h, wr, adapters, eo)
    params = leaves(h, wr, adapters)
    grads = torch.autograd.grad(loss_of(res), params, create_graph=True)
    assert all(g.requires_grad for g in grads)  # a graph exists, and it ends in the error below
    with pytest.raises(RuntimeError, match="not differentiable.*once_differentiable"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), params)
    # the first-order gradients are still right
    g_ref = torch.autograd.grad(loss_of(ctmoa_reference(h, wr, adapters, eo)), params)
    for got, want in zip(grads, g_ref):
        assert nerr(got.detach(), want) <= TOL[torch.float32]


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]))
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_no_weight_is_copied(grad):
    """No op of a forward (no_grad or not) produces a tensor of a weight's shape: the
    kernels read the caller's weights through their own pointers, nothing is stacked.
    (Cv = 20, C = 18: a weight-shaped [18, 20] or [18, 18] result would be a copy; the
    activations are [19, ...].) A dispatch mode does not see inside a custom op, so the
    op's body (the launchers) runs under the mode directly, with the plan of a call."""
    from pilot_hpc_kernels.ctmoa_fwd import mixture_forward, router_forward
    h, wr, adapters, eo = make_problem((1, 19), 20, 18, 3)
    weight_shapes = {(18, 20), (18, 18), (90, 20), (18, 90), (5, 18, 20), (5, 18, 18)}  # single, stacked (E = 5)
    with torch.set_grad_enabled(grad):
        h2, wr_, w1, b1, w2, b2, eo_, visit, keep_y = _op_args(h, wr, adapters, eo)
    assert any(keep_y) and (any(visit) == grad)  # both routes of the forward are exercised
    outer, inner = _OpLog(), _OpLog()
    with torch.set_grad_enabled(grad), outer:
        K.ctmoa_triton(h, wr, adapters, eo)
    with torch.no_grad(), inner:
        probs = router_forward(h2, wr_)[0]
        mixture_forward(h2, probs, w1, K._bias_out(b1), w2, K._bias_out(b2), eo_, visit, keep_y)
    # Triton's interpreter hands each tensor argument to the kernel as a CPU alias of the
    # same storage (new_empty(0) + set_: no data moves); those are the interpreter's, not ours.
    ops = [(op, shapes) for op, shapes in outer.ops + inner.ops if not op.startswith("aten.set_")]
    made = [(op, s) for op, shapes in ops for s in shapes if s in weight_shapes]
    assert not made, made
    assert not any("cat" in op or "stack" in op or "clone" in op for op, _ in ops), [op for op, _ in ops]
    assert any("ctmoa_fwd" in op for op, _ in outer.ops)  # the call went through the custom op
    assert any("empty" in op for op, _ in inner.ops)  # and the mode saw the launchers' allocations


def test_mixed_biases_and_all_adapters_frozen():
    h, wr, adapters, eo = make_problem((1, 17), 20, 18, 3)
    mixed = [a._replace(b1=None) if i == 1 else a._replace(b2=None) if i == 2 else a for i, a in enumerate(adapters)]
    compare((h, wr, mixed, eo))
    frozen = [AdapterWeights(*(x.detach() if x is not None else None for x in a)) for a in adapters]
    compare((h, wr, frozen, eo))  # only the router trains: every MLP keeps its Y, none is visited


def _saved_bytes(fn, inputs):
    """Bytes the autograd graph of fn() keeps: unique storages, the caller's inputs (H,
    router, weights: saved by reference in both paths) excluded."""
    theirs = {x.untyped_storage().data_ptr() for x in inputs if x is not None}
    seen, total = set(), [0]

    def pack(x):
        key = x.untyped_storage().data_ptr()
        if key not in theirs and key not in seen and x.untyped_storage().nbytes():
            seen.add(key)
            total[0] += x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return total[0], out


def test_saved_memory_and_what_is_kept():
    """At the stage-2 trainable set (3 trainable, 2 frozen MLPs, router trains, H frozen)
    the fused forward keeps Z of the 3 trainable MLPs and Y of the 2 frozen ones, plus
    probs and lse: the analytic figure of benchmark_ctmoa.saved_bytes, which is also
    checked against eager's graph here."""
    from pilot_hpc_kernels.benchmark_ctmoa import Shape, saved_bytes
    m, cv, c, t = 23, 20, 18, 3
    h, wr, adapters, eo = make_problem((1, m), cv, c, t)
    inputs = [h, wr] + [x for a in adapters for x in a]
    fused, _ = _saved_bytes(lambda: K.ctmoa_triton(h, wr, adapters, eo), inputs)
    eager, _ = _saved_bytes(lambda: ctmoa_reference(h, wr, adapters, eo), inputs)
    shape = Shape(batch=1, tokens=m, cv=cv, c=c, t=t, dtype=torch.float32)
    want = saved_bytes(shape)
    # Fused: exactly Z (3 MLPs), Y (2), probs and lse. Eager: the formula counts its
    # per-MLP activations (Z, gelu(Z), the fp32 output); its graph keeps a few router
    # tensors more ([M, T] logits and friends), so the formula is a lower bound.
    assert fused == want["fused"], (fused, want)
    assert want["eager"] <= eager <= want["eager"] + 4 * m * (4 * t + 4), (eager, want)
    assert fused <= 0.5 * want["eager"]  # (that the backward of what was kept is right: test_ctmoa.py)


def test_tiles_depend_on_bucketed_m_only():
    """The GPU tile table (no timing, so every rank picks the same): one tile per
    (kernel, dtype, power-of-two bucket of M); 16-bit tiles at the 7B M are wgmma-shaped
    (BLOCK_M a multiple of 64, whole warpgroups)."""
    from pilot_hpc_kernels.ctmoa_fwd import bucket_m, gpu_tile
    assert [bucket_m(m) for m in (1, 5, 8192, 8193, 9216)] == [1, 8, 8192, 16384, 16384]
    for kind in ("up", "down", "bwd"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert gpu_tile(kind, dtype, 8193) == gpu_tile(kind, dtype, 9216) == gpu_tile(kind, dtype, 16384)
            assert gpu_tile(kind, dtype, 513) == gpu_tile(kind, dtype, 1024)
        big = gpu_tile(kind, torch.bfloat16, 9216)
        assert big.bm % 64 == 0 and big.warps % 4 == 0 and big.bn >= 128, big
        assert gpu_tile(kind, torch.bfloat16, 1024).bm == 64  # small M: more row tiles to fill the SMs
