"""Fused Triton CT-MoA: router + mixture of the 2T-1 adapter MLPs, forward and backward.

The math is `pilot_hpc_kernels.ctmoa_reference.ctmoa_reference` (read it first). Notation:
M tokens, Cv vision width, C projector width, T router experts, E = 2T-1 MLPs.

Forward (3 launches):
  1. `_router_fwd_kernel`: logits = H W_r^T in fp32, softmax over T, logsumexp, and
     per-block partial statistics (argmax counts, probability sums, lse^2 sums) in the
     same pass over H, so L_b and L_z need no second read of H. Partials, not atomics:
     the stats are deterministic and the kernel is safe to autotune/re-run.
  2. `_mix_up_kernel`: ONE stacked GEMM [M, Cv] x [Cv, E*C] whose epilogue adds b1,
     applies exact (erf) GELU and scales each MLP's columns by the token's router
     probability of that MLP's expert: S[:, m*C:(m+1)*C] = P_e(m) * gelu(H W1_m^T + b1_m).
  3. `_mix_down_kernel`: ONE GEMM over K = E*C, out = S W2cat^T + P B2e, where
     W2cat = [W2_0 | W2_1 | ...] ([C, E*C]) and B2e[t] = sum of b2_m over the MLPs of
     expert t (the bias terms become sum_m P_e(m) b2_m). fp32 accumulation, one
     rounding to h's dtype at the store. The per-MLP outputs [E, M, C] never exist.

Backward (autograd.Function; only H, probs, lse are kept per token: S is NOT saved):
  4. `_mix_bwd_kernel`: per (token tile, column tile of one MLP) it computes
     D = G W2cat[:, cols] (K = C) and RECOMPUTES Z = H W1^T + b1 (K = Cv), then in the
     epilogue: dZ = P_e * D * gelu'(Z) (stored only for MLPs whose w1/b1 train, or all
     when H needs a grad), S = P_e * gelu(Z) (stored only for MLPs whose w2 trains) and
     the partial dP_e row sums of D * gelu(Z). Frozen MLPs are visited only when the
     router (or H) needs dP; with a frozen router they are skipped entirely.
  5. `_bias_bwd_kernel`: one read of G for the b2 terms: G b2_m (into dP) and P^T G
     (db2). 6. `_router_bwd_kernel`: dlogits = P * (dP - <P, dP>) + 2 g_z lse P and
     dW_r = dlogits^T H in one read of H (split over M, partials summed in torch).
  The pure weight-gradient GEMMs (dW2_m = G^T S_m, dW1_m = dZ_m^T H, dH = dZ W1s) go to
  torch.matmul (cuBLAS): there is nothing to fuse into them.

Cost of stacking: the per-MLP weights arrive as a list, so each forward concatenates
them (W1s [E*C, Cv], W2cat [C, E*C]; 210 MB of bf16 copies at LLaVA-7B sizes, about
0.15 ms of HBM traffic against ~3 ms of GEMMs). The stacked copies are saved for the
backward instead of being re-stacked there: weight-sized, independent of the batch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from pilot_hpc_kernels.ctmoa_reference import AdapterWeights, CTMoAOutput, RouterStats, ctmoa_reference


@triton.jit
def _gelu(z):
    """Exact (erf) GELU in fp32, as F.gelu's default: z Phi(z)."""
    return z * (0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)))


# True when this module was imported with TRITON_INTERPRET=1: the kernels then run on
# CPU tensors (numpy), and only then may a CPU tensor reach a launcher.
INTERPRETED = isinstance(_gelu, InterpretedFunction)


def _gemm_configs(gpu: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    # The interpreter would "benchmark" every config (minutes on a CPU): pin one there.
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in gpu]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), checked for sm_90 with ptxas: none of the
# forward configs spills registers in bf16. The big tiles are for bf16/fp16; the last,
# small one keeps fp32 (ieee dot, 4-byte tiles) within shared memory. Configs that do
# not fit a GPU are skipped by the autotuner (OutOfResources).
_UP_CONFIGS = _gemm_configs([(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                             (128, 64, 64, 4, 4), (64, 64, 32, 4, 3)])
# No erf epilogue here: the 128x256 tile fits in registers.
_DOWN_CONFIGS = _gemm_configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                               (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 32, 4, 3)])
# Two fp32 accumulators (D and the recomputed Z) live at once: 64x128 tiles on 8 warps
# do not spill; 128x128 spills a little (kept: the autotuner judges).
# BLOCK_N is the same in every backward config: the host sizes the dP partial buffer
# ([J * cdiv(C, BLOCK_N), M]) before the autotuner has picked a config.
_BWD_BLOCK_N = 16 if INTERPRETED else 128
_BWD_CONFIGS = _gemm_configs([(64, 128, 64, 8, 3), (64, 128, 64, 8, 4), (128, 128, 64, 8, 3),
                              (64, 128, 32, 8, 4), (32, 128, 32, 4, 2)])
# Small memory-bound kernels (router, bias, router backward): one fixed tile.
_SMALL_M = 16 if INTERPRETED else 64
_SMALL_K = 16 if INTERPRETED else 64


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
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
def _up_proj(h_ptr, w1_ptr, b1_ptr, offs_m, m_mask, rows, n_mask, CV,
             stride_hm, stride_hk, stride_w1n, stride_w1k,
             HAS_B1: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """Z tile = H[offs_m] W1s[rows]^T + b1s[rows] in fp32 ([BLOCK_M, BLOCK_N]).

    Shared by the forward and the backward recompute so both see the same math.
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_base = h_ptr + offs_m[:, None] * stride_hm  # [BM, 1] row pointers, int64 offsets
    b_base = w1_ptr + rows[None, :] * stride_w1n  # [1, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, CV, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_base + k[None, :] * stride_hk, mask=m_mask[:, None] & (k[None, :] < CV), other=0.0)  # [BM, BK]
        b = tl.load(b_base + k[:, None] * stride_w1k, mask=n_mask[None, :] & (k[:, None] < CV), other=0.0)  # [BK, BN]
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_B1:
        acc += tl.load(b1_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _router_fwd_kernel(h_ptr, wr_ptr, probs_ptr, lse_ptr, psum_ptr, cnt_ptr, lsq_ptr,
                       M, T, CV, stride_hm, stride_hk, stride_wt, stride_wk,
                       BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    t_mask = offs_t < T
    h_base = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm
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
    # Statistics of this block; rows past M must not count.
    p_valid = tl.where(m_mask[:, None], p, 0.0)
    # argmax of the probabilities (as the reference), first index on ties (as torch).
    top = tl.argmax(tl.where(t_mask[None, :], p, -1.0), axis=1, tie_break_left=True)  # [BM]
    hit = (offs_t[None, :] == top[:, None]) & m_mask[:, None]
    tl.store(psum_ptr + pid * BLOCK_T + offs_t, tl.sum(p_valid, axis=0))
    tl.store(cnt_ptr + pid * BLOCK_T + offs_t, tl.sum(hit.to(tl.float32), axis=0))
    tl.store(lsq_ptr + pid, tl.sum(tl.where(m_mask, lse * lse, 0.0), axis=0))


@triton.autotune(configs=_UP_CONFIGS, key=["M", "C", "CV"])
@triton.jit
def _mix_up_kernel(h_ptr, w1_ptr, b1_ptr, probs_ptr, eo_ptr, s_ptr,
                   M, C, CV, T, stride_hm, stride_hk, stride_w1n, stride_w1k, stride_sm,
                   HAS_B1: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grid: (row tiles x column tiles of ONE MLP, E). A column tile never straddles two
    # MLPs, so its epilogue scales by a single expert probability, for any C.
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, C, BLOCK_M, BLOCK_N, GROUP_M)
    mlp = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # column inside the MLP
    m_mask = offs_m < M
    n_mask = offs_n < C
    rows = mlp * C + offs_n  # row of W1s = column of S
    z = _up_proj(h_ptr, w1_ptr, b1_ptr, offs_m, m_mask, rows, n_mask, CV, stride_hm, stride_hk,
                 stride_w1n, stride_w1k, HAS_B1, PREC, BLOCK_M, BLOCK_N, BLOCK_K)  # [BM, BN] fp32
    act = _gelu(z)
    e = tl.load(eo_ptr + mlp)
    p = tl.load(probs_ptr + offs_m * T + e, mask=m_mask, other=0.0)  # [BM] P_e(mlp)
    s = act * p[:, None]
    tl.store(s_ptr + offs_m[:, None] * stride_sm + rows[None, :], s.to(s_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=_DOWN_CONFIGS, key=["M", "C", "K2"])
@triton.jit
def _mix_down_kernel(s_ptr, w2_ptr, probs_ptr, b2e_ptr, out_ptr,
                     M, C, K2, stride_sm, stride_w2n, stride_w2k, stride_om,
                     T: tl.constexpr, HAS_B2: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, C, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < C
    a_base = s_ptr + offs_m[:, None] * stride_sm
    b_base = w2_ptr + offs_n[None, :] * stride_w2n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    for k0 in range(0, K2, BLOCK_K):  # K2 = E*C: a K tile may straddle MLPs, S is pre-scaled
        k = k0 + offs_k
        a = tl.load(a_base + k[None, :], mask=m_mask[:, None] & (k[None, :] < K2), other=0.0)  # [BM, BK]
        b = tl.load(b_base + k[:, None] * stride_w2k, mask=n_mask[None, :] & (k[:, None] < K2), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_B2:
        # sum_m P_e(m) b2_m = sum_t P_t B2e[t]: T exact fp32 rank-1 updates.
        for t in tl.static_range(T):
            p_t = tl.load(probs_ptr + offs_m * T + t, mask=m_mask, other=0.0)  # [BM]
            b_t = tl.load(b2e_ptr + t * C + offs_n, mask=n_mask, other=0.0)  # [BN]
            acc += p_t[:, None] * b_t[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=_BWD_CONFIGS, key=["M", "C", "CV"])
@triton.jit
def _mix_bwd_kernel(g_ptr, w2_ptr, h_ptr, w1_ptr, b1_ptr, probs_ptr, eo_ptr, ids_ptr, dz_slot_ptr, s_slot_ptr,
                    dz_ptr, s_ptr, dp_ptr,
                    M, C, CV, T, stride_gm, stride_gk, stride_w2n, stride_w2k, stride_hm, stride_hk,
                    stride_w1n, stride_w1k, stride_dzm, stride_sm,
                    HAS_B1: tl.constexpr, NEED_DP: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grid: (row tiles x column tiles of one MLP, J): J walks the MLPs this backward needs.
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, C, BLOCK_M, BLOCK_N, GROUP_M)
    j = tl.program_id(1)
    mlp = tl.load(ids_ptr + j)
    dz_slot = tl.load(dz_slot_ptr + j)  # column block of the dZ buffer, -1: not needed
    s_slot = tl.load(s_slot_ptr + j)  # column block of the S buffer, -1: not needed
    e = tl.load(eo_ptr + mlp)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < C
    cols = mlp * C + offs_n  # columns of W2cat = rows of W1s
    # D = G W2cat[:, cols]: the gradient reaching P_e * gelu(Z) of this MLP.
    g_base = g_ptr + offs_m[:, None] * stride_gm
    w2_base = w2_ptr + cols[None, :] * stride_w2k
    d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    for k0 in range(0, C, BLOCK_K):
        k = k0 + offs_k
        g = tl.load(g_base + k[None, :] * stride_gk, mask=m_mask[:, None] & (k[None, :] < C), other=0.0)
        w = tl.load(w2_base + k[:, None] * stride_w2n, mask=n_mask[None, :] & (k[:, None] < C), other=0.0)
        d = tl.dot(g, w, d, input_precision=PREC)
    # Recompute instead of saving S/Z in the forward: [M, E*C] per call is the memory
    # the fused path exists to avoid.
    z = _up_proj(h_ptr, w1_ptr, b1_ptr, offs_m, m_mask, cols, n_mask, CV, stride_hm, stride_hk,
                 stride_w1n, stride_w1k, HAS_B1, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    # Epilogue ordered to keep few [BM, BN] fp32 tiles live (d, z, cdf): fewer spills.
    p = tl.load(probs_ptr + offs_m * T + e, mask=m_mask, other=0.0)[:, None]  # [BM, 1]
    mask2 = m_mask[:, None] & n_mask[None, :]
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    if NEED_DP:
        # d out / d P_e gets <G, W2 gelu(Z)> from this tile (the b2 part: _bias_bwd_kernel).
        part = tl.sum(tl.where(mask2, d * (z * cdf), 0.0), axis=1)  # [BM]
        tl.store(dp_ptr + (j * tl.cdiv(C, BLOCK_N) + pid_n) * M + offs_m, part, mask=m_mask)
    if s_slot >= 0:
        tl.store(s_ptr + offs_m[:, None] * stride_sm + (s_slot * C + offs_n)[None, :],
                 (z * cdf * p).to(s_ptr.dtype.element_ty), mask=mask2)
    if dz_slot >= 0:
        dact = cdf + z * (0.3989422804014327 * tl.exp(-0.5 * z * z))  # gelu'(z) = Phi(z) + z phi(z)
        tl.store(dz_ptr + offs_m[:, None] * stride_dzm + (dz_slot * C + offs_n)[None, :],
                 (d * p * dact).to(dz_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _bias_bwd_kernel(g_ptr, b2_ptr, probs_ptr, gb_ptr, pg_ptr,
                     M, C, E, T, stride_gm, stride_gk,
                     NEED_GB: tl.constexpr, NEED_PG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # One read of G for both b2 terms: GB = G b2s^T ([M, E], into dP) and the per-block
    # partial P^T G ([T, C] per block, summed in torch: db2_m = (P^T G)[e(m)]).
    pid = tl.program_id(0)
    offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    p = tl.load(probs_ptr + offs_m[:, None] * T + offs_t[None, :], mask=m_mask[:, None] & (offs_t[None, :] < T),
                other=0.0)  # [BM, BT]
    p_t = tl.trans(p)  # [BT, BM]
    gb = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + offs_k
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + k[None, :] * stride_gk,
                    mask=m_mask[:, None] & (k[None, :] < C), other=0.0).to(tl.float32)  # [BM, BK]
        if NEED_GB:
            b = tl.load(b2_ptr + offs_e[None, :] * C + k[:, None], mask=(offs_e[None, :] < E) & (k[:, None] < C),
                        other=0.0).to(tl.float32)  # [BK, BE]
            gb = tl.dot(g, b, gb, input_precision="ieee")
        if NEED_PG:
            pg = tl.dot(p_t, g, input_precision="ieee")  # [BT, BK]
            tl.store(pg_ptr + (pid * T + offs_t[:, None]) * C + k[None, :], pg,
                     mask=(offs_t[:, None] < T) & (k[None, :] < C))
    if NEED_GB:
        tl.store(gb_ptr + offs_m[:, None] * E + offs_e[None, :], gb, mask=m_mask[:, None] & (offs_e[None, :] < E))


@triton.jit
def _router_bwd_kernel(h_ptr, probs_ptr, dp_ptr, lse_ptr, gz_ptr, dwr_ptr, dl_ptr,
                       M, T, CV, rows_per_split, stride_hm, stride_hk,
                       WRITE_DL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # grid: (Cv tiles, M splits). Each program walks its M range once for its Cv tile;
    # the dlogits are recomputed per Cv tile (T values per token: cheaper than a store).
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    t_mask = offs_t < T
    k_mask = offs_k < CV
    gz = tl.load(gz_ptr)  # 2 * d loss / d lse_sq_sum
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)  # [BT, BK] dW_r partial
    start = pid_s * rows_per_split
    for m0 in range(start, start + rows_per_split, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_mask = offs_m < M
        mt = m_mask[:, None] & t_mask[None, :]
        p = tl.load(probs_ptr + offs_m[:, None] * T + offs_t[None, :], mask=mt, other=0.0)  # [BM, BT]
        dp = tl.load(dp_ptr + offs_m[:, None] * T + offs_t[None, :], mask=mt, other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=m_mask, other=0.0)
        inner = tl.sum(p * dp, axis=1)  # [BM]
        # softmax backward plus d(lse^2)/dc = 2 lse P; masked rows/experts have p = 0.
        dl = p * (dp - inner[:, None]) + (gz * lse)[:, None] * p  # [BM, BT]
        if WRITE_DL:
            if pid_k == 0:
                tl.store(dl_ptr + offs_m[:, None] * T + offs_t[None, :], dl, mask=mt)
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # [BM, BK]
        acc = tl.dot(tl.trans(dl), h, acc, input_precision="ieee")
    tl.store(dwr_ptr + (pid_s * T + offs_t[:, None]) * CV + offs_k[None, :], acc,
             mask=t_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------- launchers
def _pow2(n: int) -> int:
    # tl.dot needs every block dimension >= 16.
    return max(16, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: match torch's own matmul (ieee unless the user enabled TF32). The
    # option is ignored for 16-bit inputs.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=64)
def _int_tensor(values: tuple[int, ...], device: str) -> torch.Tensor:
    """Small index tables (expert_of, MLP ids, slots) as cached int32 device tensors."""
    return torch.tensor(values, dtype=torch.int32, device=device)


class _Stacked(NamedTuple):
    w1s: torch.Tensor  # [E*C, Cv]
    b1s: torch.Tensor | None  # [E*C]
    w2cat: torch.Tensor  # [C, E*C]
    b2s: torch.Tensor | None  # [E, C]


def _stack_bias(biases: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor | None:
    """[E, C] stacked biases; a missing bias is zeros (None when no MLP has one)."""
    if all(b is None for b in biases):
        return None
    return torch.stack([b if b is not None else like.new_zeros(like.shape[0]) for b in biases])


def _stack(adapters: Sequence[AdapterWeights]) -> _Stacked:
    """One tensor per weight kind (a copy per call; see the module docstring for cost)."""
    w1s = torch.cat([a.w1 for a in adapters], dim=0)
    w2cat = torch.cat([a.w2 for a in adapters], dim=1)
    b1s = _stack_bias([a.b1 for a in adapters], adapters[0].w1)  # [E, C] -> [E*C] below
    b2s = _stack_bias([a.b2 for a in adapters], adapters[0].w1)  # [E, C]
    return _Stacked(w1s, None if b1s is None else b1s.reshape(-1), w2cat, b2s)


def _per_expert_sum(x: torch.Tensor, expert_of: Sequence[int], num_experts: int) -> torch.Tensor:
    """[E, ...] -> [T, ...] fp32, summing the MLPs of each expert in a fixed order
    (index_add_ would use atomics on CUDA: not bit-reproducible)."""
    rows = []
    for t in range(num_experts):
        acc = x.new_zeros(x.shape[1:], dtype=torch.float32)
        for m in (m for m, e in enumerate(expert_of) if e == t):
            acc = acc + x[m].float()  # a view per MLP: no index tensor, no host sync
        rows.append(acc)
    return torch.stack(rows)


def _router_forward(h2: torch.Tensor, wr: torch.Tensor):
    m, cv = h2.shape  # [M, Cv]
    t = wr.shape[0]  # [T, Cv]
    bt, nb = _pow2(t), triton.cdiv(m, _SMALL_M)
    f32 = dict(dtype=torch.float32, device=h2.device)
    probs, lse = torch.empty(m, t, **f32), torch.empty(m, **f32)  # [M, T], [M]
    psum, cnt, lsq = torch.empty(nb, bt, **f32), torch.empty(nb, bt, **f32), torch.empty(nb, **f32)
    _router_fwd_kernel[(nb,)](h2, wr, probs, lse, psum, cnt, lsq, m, t, cv, h2.stride(0), h2.stride(1),
                              wr.stride(0), wr.stride(1), BLOCK_M=_SMALL_M, BLOCK_T=bt, BLOCK_K=_SMALL_K)
    # Block partials summed here: deterministic, unlike atomics.
    return probs, lse, cnt[:, :t].sum(0), psum[:, :t].sum(0), lsq.sum()


def _tiles(m: int, c: int, extra: int = 1):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c, meta["BLOCK_N"]), extra)


def _mixture_forward(h2, probs, st: _Stacked, eo: torch.Tensor, expert_of: Sequence[int]) -> torch.Tensor:
    m, cv = h2.shape
    c, k2 = st.w2cat.shape  # [C, E*C]
    e, t = k2 // c, probs.shape[1]
    prec = _precision(h2.dtype)
    s = torch.empty(m, k2, dtype=h2.dtype, device=h2.device)  # [M, E*C] P-scaled activations
    _mix_up_kernel[_tiles(m, c, e)](h2, st.w1s, st.b1s if st.b1s is not None else st.w1s, probs, eo, s,
                                    m, c, cv, t, h2.stride(0), h2.stride(1), st.w1s.stride(0), st.w1s.stride(1),
                                    s.stride(0), HAS_B1=st.b1s is not None, PREC=prec)
    b2e = None
    if st.b2s is not None:  # [T, C] fp32: the b2 of the two MLPs of an expert summed once
        b2e = _per_expert_sum(st.b2s, expert_of, t)
    out = torch.empty(m, c, dtype=h2.dtype, device=h2.device)  # [M, C]
    _mix_down_kernel[_tiles(m, c)](s, st.w2cat, probs, b2e if b2e is not None else probs, out,
                                   m, c, k2, s.stride(0), st.w2cat.stride(0), st.w2cat.stride(1), out.stride(0),
                                   T=t, HAS_B2=b2e is not None, PREC=prec)
    return out


def _router_backward(h2, probs, lse, dp, gz, need_dl: bool):
    """dW_r partials ([T, Cv] fp32) and, when H needs a grad, dlogits [M, T]."""
    m, cv = h2.shape
    t = probs.shape[1]
    n_k, n_m = triton.cdiv(cv, _SMALL_K), triton.cdiv(m, _SMALL_M)
    # ~256 programs in all: enough to fill a GPU, few enough partials to sum cheaply.
    rows = triton.cdiv(n_m, max(1, min(n_m, triton.cdiv(256, n_k)))) * _SMALL_M
    split = triton.cdiv(m, rows)
    part = torch.empty(split, t, cv, dtype=torch.float32, device=h2.device)  # [S, T, Cv]
    dl = torch.empty(m, t, dtype=torch.float32, device=h2.device) if need_dl else probs
    _router_bwd_kernel[(n_k, split)](h2, probs, dp, lse, gz, part, dl, m, t, cv, rows, h2.stride(0), h2.stride(1),
                                     WRITE_DL=need_dl, BLOCK_M=_SMALL_M, BLOCK_T=_pow2(t), BLOCK_K=_SMALL_K)
    return part.sum(0), (dl if need_dl else None)


class _CTMoAFunction(torch.autograd.Function):
    """Inputs: h2 [M, Cv], router weight [T, Cv], expert_of, then (w1, b1, w2, b2) per MLP."""

    @staticmethod
    def forward(ctx, h2, wr, expert_of, *flat):
        adapters = [AdapterWeights(*flat[i:i + 4]) for i in range(0, len(flat), 4)]
        st = _stack(adapters)
        eo = _int_tensor(tuple(expert_of), str(h2.device))
        probs, lse, counts, prob_sum, lse_sq = _router_forward(h2, wr)
        out = _mixture_forward(h2, probs, st, eo, expert_of)
        # Per token only H (the caller's tensor), probs [M, T] and lse [M] are kept.
        ctx.save_for_backward(h2, wr, probs, lse, st.w1s, st.b1s, st.w2cat, st.b2s)
        ctx.expert_of = tuple(expert_of)
        ctx.mark_non_differentiable(counts)
        return out, probs, counts, prob_sum, lse_sq

    @staticmethod
    def backward(ctx, g_out, g_probs, _g_counts, g_prob_sum, g_lse_sq):
        h2, wr, probs, lse, w1s, b1s, w2cat, b2s = ctx.saved_tensors
        expert_of, need = ctx.expert_of, ctx.needs_input_grad
        m, cv = h2.shape
        t, (c, k2) = wr.shape[0], w2cat.shape
        num_mlps, dev, f32 = k2 // c, h2.device, torch.float32
        need_h, need_wr = need[0], need[1]
        flags = [need[3 + 4 * i:7 + 4 * i] for i in range(num_mlps)]  # (w1, b1, w2, b2) per MLP
        need_dp = need_h or need_wr  # dP needs every MLP, frozen ones included
        g = g_out.contiguous()  # [M, C]
        eo = _int_tensor(expert_of, str(dev))

        # The MLPs the mixture backward visits and where their dZ / S columns go.
        ids, dz_slots, s_slots = [], [], []
        for i, (fw1, fb1, fw2, _) in enumerate(flags):
            want_dz, want_s = fw1 or fb1 or need_h, fw2
            if need_dp or want_dz or want_s:
                dz_slots.append(sum(x >= 0 for x in dz_slots) if want_dz else -1)
                s_slots.append(sum(x >= 0 for x in s_slots) if want_s else -1)
                ids.append(i)
        n_dz, n_s = sum(x >= 0 for x in dz_slots), sum(x >= 0 for x in s_slots)
        dz = torch.empty(m, n_dz * c, dtype=h2.dtype, device=dev) if n_dz else None  # [M, n_dz*C]
        s = torch.empty(m, n_s * c, dtype=h2.dtype, device=dev) if n_s else None  # [M, n_s*C]
        nb_n = triton.cdiv(c, _BWD_BLOCK_N)
        dp_part = torch.empty(len(ids) * nb_n, m, dtype=f32, device=dev) if need_dp else None  # [J*NB, M]
        if ids:
            _mix_bwd_kernel[_tiles(m, c, len(ids))](
                g, w2cat, h2, w1s, b1s if b1s is not None else w1s, probs, eo, _int_tensor(tuple(ids), str(dev)),
                _int_tensor(tuple(dz_slots), str(dev)), _int_tensor(tuple(s_slots), str(dev)),
                dz if dz is not None else g, s if s is not None else g, dp_part if need_dp else probs,
                m, c, cv, t, g.stride(0), g.stride(1), w2cat.stride(0), w2cat.stride(1), h2.stride(0), h2.stride(1),
                w1s.stride(0), w1s.stride(1), dz.stride(0) if dz is not None else 0,
                s.stride(0) if s is not None else 0, HAS_B1=b1s is not None, NEED_DP=need_dp,
                PREC=_precision(h2.dtype))

        need_gb, need_pg = need_dp and b2s is not None, any(f[3] for f in flags)
        gb = pg = None
        if need_gb or need_pg:
            nb_m = triton.cdiv(m, _SMALL_M)
            gb = torch.empty(m, num_mlps, dtype=f32, device=dev) if need_gb else None  # [M, E]
            pg_part = torch.empty(nb_m, t, c, dtype=f32, device=dev) if need_pg else None  # [NB, T, C]
            _bias_bwd_kernel[(nb_m,)](g, b2s if b2s is not None else g, probs, gb if need_gb else probs,
                                      pg_part if need_pg else probs, m, c, num_mlps, t, g.stride(0), g.stride(1),
                                      NEED_GB=need_gb, NEED_PG=need_pg, BLOCK_M=_SMALL_M, BLOCK_E=_pow2(num_mlps),
                                      BLOCK_T=_pow2(t), BLOCK_K=_SMALL_K)
            pg = pg_part.sum(0) if need_pg else None  # [T, C] = P^T G

        d_h = d_wr = dl = None
        if need_dp:
            dp_mlp = dp_part.view(num_mlps, nb_n, m).sum(1)  # [E, M]; ids == all MLPs here
            if gb is not None:
                dp_mlp = dp_mlp + gb.t()
            dp = _per_expert_sum(dp_mlp, expert_of, t).t().contiguous()  # [M, T]
            if g_probs is not None:
                dp = dp + g_probs.reshape(m, t)
            if g_prob_sum is not None:
                dp = dp + g_prob_sum.float()[None, :]
            gz = (2.0 * g_lse_sq.float()).reshape(1) if g_lse_sq is not None else torch.zeros(1, dtype=f32,
                                                                                              device=dev)
            dwr32, dl = _router_backward(h2, probs, lse, dp.contiguous(), gz, need_dl=need_h)
            d_wr = dwr32.to(wr.dtype) if need_wr else None
        if need_h:  # all MLPs hold a dZ slot, in order: one [M, E*C] x [E*C, Cv] GEMM
            d_h = (torch.matmul(dz, w1s).float() + dl @ wr.float()).to(h2.dtype)

        grads = []
        for i, (fw1, fb1, fw2, fb2) in enumerate(flags):
            j = ids.index(i) if i in ids else -1
            dz_i = dz[:, dz_slots[j] * c:(dz_slots[j] + 1) * c] if j >= 0 and dz_slots[j] >= 0 else None
            s_i = s[:, s_slots[j] * c:(s_slots[j] + 1) * c] if j >= 0 and s_slots[j] >= 0 else None
            grads += [dz_i.t() @ h2 if fw1 else None,  # [C, Cv]
                      dz_i.sum(0, dtype=f32).to(h2.dtype) if fb1 else None,  # [C]
                      g.t() @ s_i if fw2 else None,  # [C, C]
                      pg[expert_of[i]].to(h2.dtype) if fb2 else None]  # [C]
        return (d_h, d_wr, None, *grads)


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
    expected = {"w1": (c, cv), "b1": (c,), "w2": (c, c), "b2": (c,)}
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
    flat = [x for a in adapters for x in a]
    out, probs, counts, prob_sum, lse_sq = _CTMoAFunction.apply(h2, router_weight, tuple(expert_of), *flat)
    stats = RouterStats(counts=counts, prob_sum=prob_sum, lse_sq_sum=lse_sq, num_tokens=h2.shape[0])
    return CTMoAOutput(out=out.reshape(*lead, out.shape[1]), probs=probs.reshape(*lead, t), stats=stats)
