"""The fused CT-MoA (pilot_hpc_kernels.ctmoa) against ctmoa_reference (the dispatch that
picks it is tested in tests/test_ctmoa_dispatch_run.py: kernels/ imports nothing from pilot_hpc).

On a CPU machine the kernels run in Triton's interpreter (kernels/tests_ctmoa/conftest.py sets
TRITON_INTERPRET=1), in fp32 at small, deliberately awkward shapes; the fp16/bf16 cases
need a GPU. Every gradient is compared: router weight, each trainable adapter's
w1/b1/w2/b2, and H when it requires grad; frozen inputs must get no gradient at all.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys

import pytest
import torch

from pilot_hpc_kernels.ctmoa_reference import (AdapterWeights, ctmoa_reference, load_balance_loss, mlp_expert_index,
                                               z_loss)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
try:
    from pilot_hpc_kernels import ctmoa as K
except ImportError as exc:  # no triton on this machine
    K, _SKIP = None, f"pilot_hpc_kernels.ctmoa cannot be imported: {exc}"
else:
    _SKIP = None if ON_GPU or K.INTERPRETED else (
        "no GPU, and the kernels were imported without TRITON_INTERPRET=1 (set it before triton is imported)")
needs_kernels = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="fp16/bf16 kernels are checked on a GPU only (Triton's CPU "
                                                 "interpreter has no bf16 and is too slow for useful sizes)")

# Normalised max error, max|got - want| / max|want|. The two fp32 paths differ only in
# summation order (tiles and block partials vs torch's order); the longest reduction in
# these shapes is E*C <= 7*33 = 231 terms (or M <= 37 tokens, then T terms), so the
# worst case is about 231 * 2^-24 ~ 1.4e-5 per reduction, two reductions deep: 5e-5.
TOL = {torch.float32: 5e-5,
       # fp16 (eps 2^-11 ~ 4.9e-4): the reference rounds Z, gelu(Z) and every MLP output
       # to fp16 before mixing; the kernel rounds only S and out: a few eps apart.
       torch.float16: 4e-3,
       # bf16 (eps 2^-8 ~ 3.9e-3): same argument with 8x coarser rounding.
       torch.bfloat16: 3e-2}


def make_problem(lead, cv, c, t, dtype=torch.float32, *, h_grad=False, bias=True, router_grad=True, seed=0,
                 device=DEVICE, n=None):
    """H [*lead, Cv], router [T, Cv], the 2T-1 adapters (Cv -> C -> N, N = C unless given);
    stage-2 trainable set: own (0) and cross (2, 4, ..) adapters train, foreign ones
    (1, 3, ..) are frozen."""
    n = c if n is None else n
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    h = rand(*lead, cv).requires_grad_(h_grad)
    # logits of std ~1.5: a router that is neither uniform nor one-hot.
    wr = (torch.randn(t, cv, generator=gen) * 1.5 / math.sqrt(cv)).to(device).requires_grad_(router_grad)
    adapters = []
    for i in range(2 * t - 1):
        train = i % 2 == 0
        w = AdapterWeights(rand(c, cv, scale=1 / math.sqrt(cv)), rand(c, scale=0.1) if bias else None,
                           rand(n, c, scale=1 / math.sqrt(c)), rand(n, scale=0.1) if bias else None)
        adapters.append(AdapterWeights(*(x.requires_grad_(train) if x is not None else None for x in w)))
    return h, wr, adapters, mlp_expert_index(t)


def leaves(h, wr, adapters):
    return [x for x in [h, wr] + [x for a in adapters for x in a] if x is not None and x.requires_grad]


def loss_of(res, seed=1):
    """Every differentiable output matters: out, probs, prob_sum and lse_sq_sum (both
    through the real aux losses and with direct random weights)."""
    gen = torch.Generator().manual_seed(seed)
    dev = res.out.device
    g_out = torch.randn(res.out.shape, generator=gen).to(dev)
    g_p = torch.randn(res.probs.shape, generator=gen).to(dev)
    g_ps = torch.randn(res.stats.prob_sum.shape, generator=gen).to(dev)
    return ((res.out.float() * g_out).sum() + (res.probs * g_p).sum() + (res.stats.prob_sum * g_ps).sum()
            + 0.3 * res.stats.lse_sq_sum + load_balance_loss(res.stats) + z_loss(res.stats))


def nerr(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def compare(problem, dtype=torch.float32, tol=None):
    h, wr, adapters, eo = problem
    tol = TOL[dtype] if tol is None else tol
    ref = ctmoa_reference(h, wr, adapters, eo)
    fused = K.ctmoa_triton(h, wr, adapters, eo)
    assert fused.out.dtype == h.dtype and fused.out.shape == ref.out.shape
    assert fused.probs.dtype == torch.float32 and fused.probs.shape == ref.probs.shape
    assert fused.stats.num_tokens == ref.stats.num_tokens
    for name, got, want in [("out", fused.out, ref.out), ("probs", fused.probs, ref.probs),
                            ("prob_sum", fused.stats.prob_sum, ref.stats.prob_sum),
                            ("lse_sq_sum", fused.stats.lse_sq_sum, ref.stats.lse_sq_sum)]:
        assert nerr(got, want) <= tol, f"{name}: normalised error {nerr(got, want):.2e} > {tol:.0e}"
    assert torch.equal(fused.stats.counts, ref.stats.counts), (fused.stats.counts, ref.stats.counts)
    params = leaves(h, wr, adapters)
    g_ref = torch.autograd.grad(loss_of(ref), params)
    g_fused = torch.autograd.grad(loss_of(fused), params)
    for i, (got, want) in enumerate(zip(g_fused, g_ref)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert nerr(got, want) <= tol, f"grad {i} {tuple(want.shape)}: normalised error {nerr(got, want):.2e}"
    return fused


@needs_kernels
@pytest.mark.parametrize("lead,cv,c,t", [
    ((1, 37), 24, 20, 3),  # batch 1; 37 tokens, not a multiple of the 16-row tile; Cv, C not powers of 2
    ((2, 9), 40, 36, 2),  # T = 2 (3 MLPs); C spans three 16-column tiles
    ((3, 7), 17, 33, 4),  # T = 4 (7 MLPs); every size odd
    ((1,), 16, 16, 3),  # a single token
    ((1, 5), 16, 16, 1),  # T = 1: one MLP, probabilities all 1
])
def test_matches_reference_fp32(lead, cv, c, t):
    compare(make_problem(lead, cv, c, t))


@needs_kernels
@pytest.mark.parametrize("lead,cv,c,n,t,h_grad", [
    ((2, 13), 24, 20, 12, 3, False),  # N < C: Qwen-VL's merger MLP (5120 -> 5120 -> 3584 at 7B)
    ((1, 19), 16, 18, 33, 2, True),  # N > C, N spans three 16-column tiles; H's gradient too
])
def test_matches_reference_when_the_output_width_differs(lead, cv, c, n, t, h_grad):
    fused = compare(make_problem(lead, cv, c, t, h_grad=h_grad, n=n))
    assert fused.out.shape[-1] == n


@needs_kernels
def test_input_gradient_when_h_requires_grad():
    compare(make_problem((2, 11), 24, 20, 3, h_grad=True))


@needs_kernels
def test_adapters_without_biases_and_frozen_router():
    compare(make_problem((1, 21), 20, 18, 3, bias=False))
    compare(make_problem((1, 21), 20, 18, 3, router_grad=False))


@needs_kernels
@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_strided_h(layout):
    """The launchers pass strides: neither a padded row pitch nor a column-major H is copied."""
    h, wr, adapters, eo = make_problem((1, 24), 20, 18, 2)
    if layout == "row_slice":  # [1, 24, 20] view of [1, 24, 40]: row stride 40
        wide = torch.zeros(1, 24, 40, device=DEVICE)
        wide[..., :20] = h.detach()
        hs = wide[..., :20]
    else:  # [1, 24, 20] view of [1, 20, 24]: element stride 24 along Cv
        hs = h.detach().transpose(1, 2).contiguous().transpose(1, 2)
    assert not hs.is_contiguous() and torch.equal(hs, h.detach())
    compare((hs, wr, adapters, eo))


@needs_kernels
def test_frozen_inputs_get_no_gradient(monkeypatch):
    """The backward must return None (compute nothing) for every frozen input."""
    returned = []
    original = K.mixture_backward

    def spy(*args):
        out = original(*args)
        returned.append((tuple(args[-1]), out))
        return out

    monkeypatch.setattr(K, "mixture_backward", spy)
    h, wr, adapters, eo = make_problem((1, 19), 20, 18, 3)
    res = K.ctmoa_triton(h, wr, adapters, eo)
    loss_of(res).backward()
    (needs, grads), = returned
    assert len(grads) == len(needs)
    for i, (need, g) in enumerate(zip(needs, grads)):
        assert (g is not None) == bool(need), f"input {i}: needs grad {need}, got {type(g)}"
    assert h.grad is None
    for i, a in enumerate(adapters):
        for x in a:
            assert (x.grad is not None) == (i % 2 == 0)
    assert wr.grad is not None


@needs_kernels
def test_gradients_from_aux_losses_only():
    h, wr, adapters, eo = make_problem((1, 30), 24, 20, 3, h_grad=True)
    ref, fused = ctmoa_reference(h, wr, adapters, eo), K.ctmoa_triton(h, wr, adapters, eo)
    l_ref = load_balance_loss(ref.stats) + z_loss(ref.stats)
    l_fused = load_balance_loss(fused.stats) + z_loss(fused.stats)
    for got, want in zip(torch.autograd.grad(l_fused, [h, wr]), torch.autograd.grad(l_ref, [h, wr])):
        assert nerr(got, want) <= TOL[torch.float32]


@needs_kernels
def test_argmax_ties_count_for_the_first_expert():
    """Exact ties (two identical router rows) go to the lower index, as torch.argmax.
    (Only the GPU run can catch a wrong tie rule: the interpreter's argmax is always
    leftmost, whatever tie_break_left says.)"""
    h, wr, adapters, eo = make_problem((1, 40), 16, 16, 3)
    with torch.no_grad():
        wr[1] = wr[0]
    fused = compare((h, wr, adapters, eo))
    assert fused.stats.counts[1] == 0 and fused.stats.counts[0] > 0


@needs_kernels
def test_deterministic_and_no_grad_mode():
    h, wr, adapters, eo = make_problem((1, 25), 24, 20, 3)
    a = K.ctmoa_triton(h, wr, adapters, eo)
    with torch.no_grad():
        b = K.ctmoa_triton(h, wr, adapters, eo)
    assert not b.out.requires_grad
    assert torch.equal(a.out.detach(), b.out) and torch.equal(a.stats.prob_sum.detach(), b.stats.prob_sum)


@needs_kernels
def test_no_tokens():
    h, wr, adapters, eo = make_problem((2, 0), 16, 16, 2)
    res = K.ctmoa_triton(h, wr, adapters, eo)
    assert res.out.shape == (2, 0, 16) and res.probs.shape == (2, 0, 2) and res.stats.num_tokens == 0


@needs_kernels
def test_bad_inputs_raise_value_error():
    h, wr, adapters, eo = make_problem((1, 5), 16, 16, 2)
    with pytest.raises(ValueError, match="router weight"):
        K.ctmoa_triton(h, wr[:, :8], adapters, eo)
    with pytest.raises(ValueError, match=r"adapter 1 w2 has shape \(16, 8\)"):
        bad = list(adapters)
        bad[1] = bad[1]._replace(w2=bad[1].w2[:, :8])
        K.ctmoa_triton(h, wr, bad, eo)
    with pytest.raises(ValueError, match="float64"):
        K.ctmoa_triton(h.double(), wr, adapters, eo)
    with pytest.raises(ValueError, match="adapter 0 w1 is torch.float64"):
        bad = list(adapters)
        bad[0] = bad[0]._replace(w1=bad[0].w1.double())
        K.ctmoa_triton(h, wr, bad, eo)
    with pytest.raises(ValueError, match="out of range"):
        K.ctmoa_triton(h, wr, adapters, [0, 1, 2])
    with pytest.raises(ValueError, match="3 adapters but 2"):
        K.ctmoa_triton(h, wr, adapters, eo[:2])


@pytest.mark.cuda
@gpu_only
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,cv,c,t", [((2, 300), 96, 80, 3), ((1, 577), 136, 200, 2), ((3, 65), 64, 72, 4)])
def test_matches_reference_half_precision(dtype, lead, cv, c, t):
    compare(make_problem(lead, cv, c, t, dtype, h_grad=True), dtype)


@pytest.mark.cuda
@gpu_only
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_half_precision_rectangular(dtype):
    compare(make_problem((2, 256), 160, 160, 3, dtype, h_grad=True, n=112), dtype)  # Qwen's 5:5:3.5 at 1/32


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="GPU-sized fp32 check: far too slow in Triton's CPU interpreter")
@needs_kernels
def test_matches_reference_fp32_gpu_larger():
    compare(make_problem((2, 576), 256, 320, 3), torch.float32, tol=1e-4)  # longer reductions: K*eps grows


# ----------------------------------------------------------------------------- GPU compile
_COMPILE_SCRIPT = r'''
import os, subprocess, tempfile
import triton, torch
from triton.backends.nvidia.compiler import get_ptxas
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import pilot_hpc_kernels.ctmoa_fwd as F
import pilot_hpc_kernels.ctmoa_bwd as B
assert not F.INTERPRETED
INT_PTRS = {"ye_ptr"}
F32_PTRS = {"probs_ptr", "lse_ptr", "psum_ptr", "cnt_ptr", "lsq_ptr", "bias_ptr", "dp_ptr", "dpe_ptr", "pg_ptr",
            "dwr_ptr", "dl_ptr", "gz_ptr", "wr_ptr", "b2v_ptr"}
UNIT_STRIDES = {"stride_hk", "stride_wk", "stride_w1k", "stride_w2k", "stride_gk"}  # 1 at run time: specialised
SMALL_INTS = {"T", "e"}  # not multiples of 16 at run time
NK = 3  # the three trainable MLPs of stage 2 in the mixed GEMM
try:
    _ptxas = get_ptxas(90)  # triton 3.9: per-architecture ptxas
except TypeError:
    _ptxas = get_ptxas()
PTXAS = getattr(_ptxas, "path", _ptxas)

def build(fn, dtype, consts, warps, stages):
    consts = dict(consts, **{n: 1 for n in fn.arg_names if n in UNIT_STRIDES})
    def ty(n):
        if n in consts: return "constexpr"
        if n == "w2_ptrs": return tuple("*" + dtype for _ in range(NK))
        return "*i32" if n in INT_PTRS else "*fp32" if n in F32_PTRS else "*" + dtype if n.endswith("_ptr") else "i32"
    sig = {n: ty(n) for n in fn.arg_names}
    # a launch at LLaVA sizes sees 16-aligned pointers and sizes/strides divisible by 16
    attrs = {}
    for i, n in enumerate(fn.arg_names):
        if n == "w2_ptrs":
            attrs.update({(i, j): [["tt.divisibility", 16]] for j in range(NK)})
        elif sig[n] != "constexpr" and n not in SMALL_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})

M = 9216  # LLaVA-7B: 16 x 576 tokens
for dtype, tdtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    for fn, kind, flags in [(F._up_kernel, "up", dict(HAS_B1=True, SCALE=True, SAVE_Z=True, PREC="ieee")),
                            (F._down_kernel, "down", dict(T=3, NK=NK, NY=2, BIAS=1, PREC="ieee")),
                            (B._mix_bwd_kernel, "bwd", dict(NEED_DP=True, NEED_DZ=True, NEED_S=True, PREC="ieee"))]:
        tile = F.pick_tile(kind, tdtype, M)
        k = build(fn, dtype, dict(flags, BLOCK_M=tile.bm, BLOCK_N=tile.bn, BLOCK_K=tile.bk, GROUP_M=tile.group_m),
                  tile.warps, tile.stages)
        if dtype == "bf16":  # the 16-bit tiles are sized for Hopper's warpgroup MMA, without spills
            assert "wgmma.mma_async" in k.asm["ptx"], (kind, "no wgmma in the PTX")
            with tempfile.TemporaryDirectory() as tmp:
                ptx = os.path.join(tmp, "k.ptx")
                open(ptx, "w").write(k.asm["ptx"])
                info = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                      capture_output=True, text=True)
            spills = [l for l in (info.stdout + info.stderr).splitlines() if "spill stores" in l]
            assert spills and all(" 0 bytes spill stores" in l for l in spills), (kind, tile, spills)
            print(kind, "wgmma", "ok")
    small = dict(BLOCK_M=64, BLOCK_T=16, BLOCK_K=64)
    build(F._router_fwd_kernel, dtype, small, 4, 3)
    build(B._router_bwd_kernel, dtype, dict(small, WRITE_DL=True), 4, 3)
    build(B._bias_bwd_kernel, dtype, dict(small, NY=2, HAS_B=True, NEED_DPE=True, NEED_PG=True), 4, 3)
print("compiled")
'''


def _sm90_compile_skip() -> str | None:
    try:
        import triton
        from triton.compiler import ASTSource
    except ImportError as exc:
        return f"triton unavailable: {exc}"
    if ON_GPU:
        return "a GPU is present: the kernel tests compile and run them for real"
    if not triton.__version__.startswith("3.") or "constexprs" not in inspect.signature(ASTSource).parameters:
        return f"the ahead-of-time compile API this check uses is that of triton 3.x (found {triton.__version__})"
    return None


@pytest.mark.skipif(_sm90_compile_skip() is not None, reason=_sm90_compile_skip() or "")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the GPU compiler rejects: compile every kernel (the
    bf16 and fp32 tiles `pick_tile` gives at the LLaVA-7B M) for an H100 (sm_90) down to
    a cubin with triton's bundled ptxas, in a subprocess where TRITON_INTERPRET is unset,
    and check that the three GEMM kernels' bf16 tiles compile to wgmma without register
    spills (ptxas -v)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's default-change warning
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
    assert run.stdout.count(" wgmma ") == 3, run.stdout
