"""Forward kernels of the fused CT-MoA and their launchers.

The math is `pilot_hpc_kernels.ctmoa_reference.ctmoa_reference`. Notation: M tokens,
Cv vision width, C the MLPs' hidden width, N their output width (C = N in LLaVA's
projector; Qwen-VL's merger MLP has N < C), T router experts, E = 2T-1 MLPs.

Launches of one forward:
  1. `_router_fwd_kernel`: logits = H W_r^T in fp32, softmax, logsumexp and per-block
     partial statistics (argmax counts, probability sums, lse^2 sums) in one pass over
     H. Partials, not atomics: deterministic and safe to re-run.
  2. `_up_kernel`, once per MLP m (its own w1/b1, no stacked copy): Z = H W1_m^T + b1_m
     with an epilogue that applies exact GELU and, for the MLPs mixed in step 3, scales
     by the token's probability of m's expert: S_m = P_e(m) gelu(Z). It also stores Z
     for the MLPs the backward visits (so the backward recomputes nothing).
  3. For each frozen MLP whose output the backward needs for dP (the router trains):
     `_down_kernel` with one K segment gives Y_m = gelu(Z_m) W2_m^T + b2_m, kept in the
     compute dtype as eager keeps it (eager keeps it in fp32).
  4. `_down_kernel`: out = sum_m S_m W2_m^T + sum_t P_t B2e[t] + sum_frozen P_e Y_m, one
     fp32 accumulator over K = (number of mixed MLPs) x C; the W2_m [N, C] arrive as a tuple of
     pointers (a grouped GEMM), one rounding to h's dtype at the store.

Tiles are chosen deterministically (`pick_tile`), not by timing: the choice depends only
on the kernel, the dtype and M rounded up to a power of two, so every rank of a job and
every token count in a bucket gets the same config with no re-tuning.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def gelu(z):
    """Exact (erf) GELU in fp32, as F.gelu's default: z Phi(z)."""
    return z * (0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)))


# True when this module was imported with TRITON_INTERPRET=1: the kernels then run on
# CPU tensors (numpy), and only then may a CPU tensor reach a launcher.
INTERPRETED = isinstance(gelu, InterpretedFunction)


# ----------------------------------------------------------------------------- tiles
class Tile(NamedTuple):
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    group_m: int = 8


# One accumulator is live in every GEMM kernel (the backward loads the saved Z instead
# of recomputing it next to D), so the 16-bit tiles are wgmma-sized on sm_90: BLOCK_M a
# multiple of 64, whole warpgroups. Chosen without a GPU, by one rule: the largest tile
# that ptxas (-v, sm_90a, bf16, at the stage-2 flags) compiles without spilling.
# Measured registers/spills per thread: up 128x128 w8: 173, none (128x256: 212 B spilled);
# down 128x128 w8: 185, none (128x256: 108 B); bwd 64x128 w8: 175, none (128x128 w8: 140 B,
# the epilogue's Z, gelu, gelu' and three stores beside D). fp32 (ieee dot, no MMA) keeps
# 4-byte tiles within shared memory. Rows: kernel -> (16-bit large M, 16-bit small M, fp32).
# test_kernels_compile_for_sm90_without_a_gpu checks wgmma and no spills for the first column.
_TILES = {
    "up": (Tile(128, 128, 64, 8, 4), Tile(64, 128, 64, 4, 4), Tile(64, 64, 32, 4, 3)),
    "down": (Tile(128, 128, 64, 8, 4), Tile(64, 128, 64, 4, 4), Tile(64, 64, 32, 4, 3)),
    "bwd": (Tile(64, 128, 64, 8, 4), Tile(64, 128, 64, 8, 4), Tile(64, 64, 32, 4, 3)),
}
_INTERP_TILE = Tile(16, 16, 16, 4, 1, 2)  # the interpreter runs tiles as numpy: small is fast
_SMALL_M_BUCKET = 1024  # below ~8 row tiles of 128 per column panel, 64-row tiles fill the SMs better
# Small memory-bound kernels (router, bias, router backward): one fixed tile.
SMALL_M = 16 if INTERPRETED else 64
SMALL_K = 16 if INTERPRETED else 64


def bucket_m(m: int) -> int:
    """M rounded up to a power of two: the only thing about M the tile choice sees."""
    return triton.next_power_of_2(max(int(m), 1))


def pick_tile(kind: str, dtype: torch.dtype, m: int) -> Tile:
    """The tile of a GEMM kernel: a pure function of (kind, dtype, bucketed M)."""
    return _INTERP_TILE if INTERPRETED else gpu_tile(kind, dtype, m)


def gpu_tile(kind: str, dtype: torch.dtype, m: int) -> Tile:
    big, small, fp32 = _TILES[kind]
    if dtype == torch.float32:
        return fp32
    return small if bucket_m(m) <= _SMALL_M_BUCKET else big


def pow2(n: int) -> int:
    # tl.dot needs every block dimension >= 16.
    return max(16, triton.next_power_of_2(n))


def precision(dtype: torch.dtype) -> str:
    # fp32 inputs: match torch's own matmul (ieee unless the user enabled TF32). The
    # option is ignored for 16-bit inputs.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=64)
def int_tensor(values: tuple[int, ...], device: str) -> torch.Tensor:
    """Small index tables as cached int32 device tensors."""
    return torch.tensor(values, dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------- launch log
class Launch(NamedTuple):
    """One GEMM-bearing launch: name, grid, GEMM sizes (m x n x k) and the tile used
    (None for torch.matmul). The cost model (benchmark_ctmoa) is checked against these."""
    name: str
    grid: tuple | None
    m: int
    n: int
    k: int
    tile: Tile | None


LAUNCHES: list[Launch] | None = None  # set to a list to record the launches (tests, cost model)


def record(name: str, grid, m: int, n: int, k: int, tile: Tile | None = None) -> None:
    if LAUNCHES is not None:
        LAUNCHES.append(Launch(name, grid, int(m), int(n), int(k), tile))


def tiles_grid(m: int, n: int, tile: Tile) -> tuple[int]:
    return (triton.cdiv(m, tile.bm) * triton.cdiv(n, tile.bn),)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles share each column panel while it is in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _router_fwd_kernel(h_ptr, wr_ptr, probs_ptr, lse_ptr, psum_ptr, cnt_ptr, lsq_ptr,
                       M, T, CV, stride_hm, stride_hk, stride_wt, stride_wk,
                       BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * stride can pass 2^31
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    t_mask = offs_t < T
    h_base = h_ptr + offs_m[:, None] * stride_hm
    acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)  # [BM, BT] logits
    for k0 in range(0, CV, BLOCK_K):
        k = k0 + offs_k
        h = tl.load(h_base + k[None, :] * stride_hk, mask=m_mask[:, None] & (k[None, :] < CV), other=0.0)
        w = tl.load(wr_ptr + offs_t[None, :] * stride_wt + k[:, None] * stride_wk,
                    mask=t_mask[None, :] & (k[:, None] < CV), other=0.0)  # [BK, BT]
        # The reference router is an fp32 GEMM (h.float() @ W_r.float()): ieee, not tf32.
        acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    logits = tl.where(t_mask[None, :], acc, float("-inf"))
    row_max = tl.max(logits, axis=1)  # [BM]
    ex = tl.exp(logits - row_max[:, None])  # padded experts -> exp(-inf) = 0
    denom = tl.sum(ex, axis=1)
    p = ex / denom[:, None]  # [BM, BT]
    lse = row_max + tl.log(denom)  # [BM]
    tl.store(probs_ptr + offs_m[:, None] * T + offs_t[None, :], p, mask=m_mask[:, None] & t_mask[None, :])
    tl.store(lse_ptr + offs_m, lse, mask=m_mask)
    p_valid = tl.where(m_mask[:, None], p, 0.0)  # rows past M must not count
    # argmax of the probabilities (as the reference), first index on ties (as torch).
    top = tl.argmax(tl.where(t_mask[None, :], p, -1.0), axis=1, tie_break_left=True)  # [BM]
    hit = (offs_t[None, :] == top[:, None]) & m_mask[:, None]
    tl.store(psum_ptr + pid * BLOCK_T + offs_t, tl.sum(p_valid, axis=0))
    tl.store(cnt_ptr + pid * BLOCK_T + offs_t, tl.sum(hit.to(tl.float32), axis=0))
    tl.store(lsq_ptr + pid, tl.sum(tl.where(m_mask, lse * lse, 0.0), axis=0))


@triton.jit
def _up_kernel(h_ptr, w1_ptr, b1_ptr, probs_ptr, s_ptr, z_ptr,
               M, C, CV, T, e, stride_hm, stride_hk, stride_w1n, stride_w1k, stride_sm, stride_zm,
               HAS_B1: tl.constexpr, SCALE: tl.constexpr, SAVE_Z: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # One MLP: S = [P_e *] gelu(H W1^T + b1) [M, C]; Z stored too when SAVE_Z.
    pid_m, pid_n = tile_ids(tl.program_id(0), M, C, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < C
    a_base = h_ptr + offs_m[:, None] * stride_hm  # [BM, 1]
    b_base = w1_ptr + offs_n[None, :] * stride_w1n  # [1, BN]
    z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    for k0 in range(0, CV, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_base + k[None, :] * stride_hk, mask=m_mask[:, None] & (k[None, :] < CV), other=0.0)  # [BM, BK]
        b = tl.load(b_base + k[:, None] * stride_w1k, mask=n_mask[None, :] & (k[:, None] < CV), other=0.0)  # [BK, BN]
        z = tl.dot(a, b, z, input_precision=PREC)
    if HAS_B1:
        z += tl.load(b1_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask2 = m_mask[:, None] & n_mask[None, :]
    if SAVE_Z:
        tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :], z.to(z_ptr.dtype.element_ty), mask=mask2)
    s = gelu(z)
    if SCALE:
        s = s * tl.load(probs_ptr + offs_m * T + e, mask=m_mask, other=0.0)[:, None]
    tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :], s.to(s_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _down_kernel(s_ptr, w2_ptrs, probs_ptr, bias_ptr, y_ptr, ye_ptr, out_ptr,
                 M, N, C, stride_sm, stride_w2n, stride_w2k, stride_yj, stride_ym, stride_om,
                 T: tl.constexpr, NK: tl.constexpr, NY: tl.constexpr, BIAS: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # out [M, N] = sum_i S[:, i*C:(i+1)*C] W2_i^T  (+ bias)  + sum_j P_{ye[j]} Y_j; W2_i [N, C]
    # BIAS: 0 none; 1 sum_t P_t B[t] with B [T, N] fp32; 2 a plain bias B [N].
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_base = s_ptr + offs_m[:, None] * stride_sm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    for i in tl.static_range(NK):  # the K segments, one per MLP: no tile straddles two
        b_base = w2_ptrs[i] + offs_n[None, :] * stride_w2n
        for k0 in range(0, C, BLOCK_K):
            k = k0 + offs_k
            a = tl.load(a_base + (i * C + k)[None, :], mask=m_mask[:, None] & (k[None, :] < C), other=0.0)
            b = tl.load(b_base + k[:, None] * stride_w2k, mask=n_mask[None, :] & (k[:, None] < C), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    if BIAS == 1:
        for t in tl.static_range(T):  # T exact fp32 rank-1 updates
            p_t = tl.load(probs_ptr + offs_m * T + t, mask=m_mask, other=0.0)  # [BM]
            b_t = tl.load(bias_ptr + t * N + offs_n, mask=n_mask, other=0.0)  # [BN]
            acc += p_t[:, None] * b_t[None, :]
    if BIAS == 2:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask2 = m_mask[:, None] & n_mask[None, :]
    # A loop, not unrolled: unrolled, both Y tiles were loaded at once next to acc, and the
    # 128x128 bf16 tile (8 warps) spilled 88 bytes at NY = 2 (0 with NY = 0; ptxas -v, sm_90a).
    for j in range(NY):
        p_j = tl.load(probs_ptr + offs_m * T + tl.load(ye_ptr + j), mask=m_mask, other=0.0)  # [BM]
        y = tl.load(y_ptr + j * stride_yj + offs_m[:, None] * stride_ym + offs_n[None, :], mask=mask2, other=0.0)
        acc += p_j[:, None] * y.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask2)


# ----------------------------------------------------------------------------- launchers
def router_forward(h2: torch.Tensor, wr: torch.Tensor):
    m, cv = h2.shape  # [M, Cv]
    t = wr.shape[0]  # [T, Cv]
    bt, nb = pow2(t), triton.cdiv(m, SMALL_M)
    f32 = dict(dtype=torch.float32, device=h2.device)
    probs, lse = torch.empty(m, t, **f32), torch.empty(m, **f32)  # [M, T], [M]
    psum, cnt, lsq = torch.empty(nb, bt, **f32), torch.empty(nb, bt, **f32), torch.empty(nb, **f32)
    record("router fwd", (nb,), m, t, cv)
    _router_fwd_kernel[(nb,)](h2, wr, probs, lse, psum, cnt, lsq, m, t, cv, h2.stride(0), h2.stride(1),
                              wr.stride(0), wr.stride(1), BLOCK_M=SMALL_M, BLOCK_T=bt, BLOCK_K=SMALL_K)
    # Block partials summed here: deterministic, unlike atomics.
    return probs, lse, cnt[:, :t].sum(0), psum[:, :t].sum(0), lsq.sum()


def _up(h2, w1, b1, probs, e: int, s, z, scale: bool, name: str):
    m, cv = h2.shape
    c = w1.shape[0]
    tile = pick_tile("up", h2.dtype, m)
    grid = tiles_grid(m, c, tile)
    record(name, grid, m, c, cv, tile)
    _up_kernel[grid](h2, w1, b1 if b1 is not None else w1, probs, s, z if z is not None else s,
                     m, c, cv, probs.shape[1], e, h2.stride(0), h2.stride(1), w1.stride(0), w1.stride(1),
                     s.stride(0), z.stride(0) if z is not None else 0,
                     HAS_B1=b1 is not None, SCALE=scale, SAVE_Z=z is not None, PREC=precision(h2.dtype),
                     BLOCK_M=tile.bm, BLOCK_N=tile.bn, BLOCK_K=tile.bk, GROUP_M=tile.group_m,
                     num_warps=tile.warps, num_stages=tile.stages)


def _down(s, w2s: Sequence[torch.Tensor], probs, bias, bias_mode: int, y, ye, out, name: str):
    m, n = out.shape  # [M, N]: N the MLPs' output width
    c = w2s[0].shape[1] if w2s else n  # each W2 [N, C]: one K segment of C per MLP
    w2s = [w if w.stride() == w2s[0].stride() else w.contiguous() for w in w2s]  # one stride pair for all
    ny = 0 if y is None else y.shape[0]
    tile = pick_tile("down", out.dtype, m)
    grid = tiles_grid(m, n, tile)
    record(name, grid, m, n, len(w2s) * c, tile)
    ref_w = w2s[0] if w2s else out  # an unused stand-in when there is nothing to multiply
    _down_kernel[grid](s if s is not None else out, tuple(w2s) if w2s else (ref_w,), probs,
                       bias if bias is not None else probs, y if y is not None else out,
                       ye if ye is not None else probs, out, m, n, c,
                       s.stride(0) if s is not None else 0, ref_w.stride(0), ref_w.stride(1),
                       y.stride(0) if ny else 0, y.stride(1) if ny else 0, out.stride(0),
                       T=probs.shape[1], NK=len(w2s), NY=ny, BIAS=bias_mode, PREC=precision(out.dtype),
                       BLOCK_M=tile.bm, BLOCK_N=tile.bn, BLOCK_K=tile.bk, GROUP_M=tile.group_m,
                       num_warps=tile.warps, num_stages=tile.stages)


def per_expert_bias(b2: Sequence[torch.Tensor | None], mlps: Sequence[int], expert_of: Sequence[int],
                    num_experts: int, n: int, like: torch.Tensor) -> torch.Tensor | None:
    """[T, N] fp32: the b2 of the listed MLPs summed per expert in a fixed order (bias-sized,
    no atomics); None when none of them has a bias."""
    if all(b2[i] is None for i in mlps):
        return None
    out = torch.zeros(num_experts, n, dtype=torch.float32, device=like.device)
    for i in mlps:
        if b2[i] is not None:
            out[expert_of[i]] += b2[i].float()
    return out


def mixture_forward(h2, probs, w1, b1, w2, b2, expert_of: Sequence[int], visit: Sequence[bool],
                    keep_y: Sequence[bool]):
    """out [M, N]; Z [M, n_visit*C] of the visited MLPs; Y [n_y, M, N] of the kept frozen ones."""
    m, _ = h2.shape
    c, n, t = w1[0].shape[0], w2[0].shape[0], probs.shape[1]
    mixed = [i for i in range(len(w1)) if not keep_y[i]]
    kept = [i for i in range(len(w1)) if keep_y[i]]
    n_visit = sum(bool(v) for v in visit)
    like = dict(dtype=h2.dtype, device=h2.device)
    s = torch.empty(m, len(mixed) * c, **like)  # [M, n_mixed*C] P-scaled activations
    z = torch.empty(m, n_visit * c, **like)  # [M, n_visit*C] pre-activations kept for the backward
    y = torch.empty(len(kept), m, n, **like)  # [n_y, M, N] frozen MLPs' outputs kept for dP
    zi = 0
    for j, i in enumerate(mixed):
        zs = None
        if visit[i]:
            zs, zi = z[:, zi * c:(zi + 1) * c], zi + 1
        _up(h2, w1[i], b1[i], probs, expert_of[i], s[:, j * c:(j + 1) * c], zs, True, "up")
    if kept:
        a = torch.empty(m, c, **like)  # [M, C] gelu(Z) of one frozen MLP at a time
        for j, i in enumerate(kept):
            _up(h2, w1[i], b1[i], probs, expert_of[i], a, None, False, "up frozen")
            _down(a, [w2[i]], probs, b2[i], 0 if b2[i] is None else 2, None, None, y[j], "down frozen Y")
    b2e = per_expert_bias(b2, mixed, expert_of, t, n, h2)
    out = torch.empty(m, n, **like)  # [M, N]
    ye = int_tensor(tuple(expert_of[i] for i in kept), str(h2.device)) if kept else None
    _down(s if mixed else None, [w2[i] for i in mixed], probs, b2e, 0 if b2e is None else 1,
          y if kept else None, ye, out, "down mix")
    return out, z, y
