"""Backward kernels of the fused CT-MoA and their launcher.

The backward visits only the MLPs that have something to train (all of them only when H
needs a gradient) and recomputes nothing: the forward kept what eager keeps.
  * A visited MLP m: `_mix_bwd_kernel` computes D = G W2_m (K = N, one fp32 accumulator)
    and, in the epilogue, with the Z_m the forward stored: dZ = P_e D gelu'(Z) (when
    w1/b1 train or H needs a grad), S = P_e gelu(Z) (when w2 trains) and the row sums
    of D gelu(Z), this MLP's share of dP_e.
  * A frozen MLP (the router trains): its share of dP_e is <G, Y_m> with the Y_m the
    forward kept, an element-wise product in `_bias_bwd_kernel` (no GEMM: as eager).
  * `_bias_bwd_kernel`, one read of G: G (sum of b2 of the visited MLPs of each expert)
    and the <G, Y_m> terms into dP [M, T]; the per-block partial P^T G for db2.
  * `_router_bwd_kernel`: dlogits = P (dP - <P, dP>) + 2 g_z lse P and dW_r = dlogits^T H
    in one read of H (split over M, partials summed in torch).
The weight-gradient GEMMs (dW2 = G^T S, dW1 = dZ^T H, dH = dZ W1) go to torch.matmul:
there is nothing to fuse into them. GEMM FLOPs: per visited MLP D, dW2 and dW1 (and dH),
the same GEMMs eager's autograd runs (benchmark_ctmoa.cost_model counts both).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from pilot_hpc_kernels.ctmoa_fwd import (SMALL_K, SMALL_M, int_tensor, per_expert_bias, pick_tile, pow2, precision,
                                         record, tile_ids, tiles_grid)


@triton.jit
def _mix_bwd_kernel(g_ptr, w2_ptr, z_ptr, probs_ptr, dz_ptr, s_ptr, dp_ptr,
                    M, C, N, T, e, stride_gm, stride_gk, stride_w2n, stride_w2k, stride_zm, stride_dzm, stride_sm,
                    NEED_DP: tl.constexpr, NEED_DZ: tl.constexpr, NEED_S: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, C, BLOCK_M, BLOCK_N, GROUP_M)
    # The tile's first row goes into the scalar base pointers in int64 (row * stride can
    # pass 2^31); inside the tile the offsets are int32 (the launcher checks BLOCK_M *
    # stride < 2^31). With int64 offset tensors the 128x128 bf16 tile spilled 196 bytes
    # on sm_90 (ptxas -v), with int32 ones 140 (the table in ctmoa_fwd picks 64x128: none).
    row0 = pid_m.to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)  # [BM] int32, tile-local
    offs_m = pid_m * BLOCK_M + rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < C
    g_ptr += row0 * stride_gm
    z_ptr += row0 * stride_zm
    dz_ptr += row0 * stride_dzm
    s_ptr += row0 * stride_sm
    probs_ptr += row0 * T
    # D = G W2[:, cols] (G [M, N], W2 [N, C], K = N): the gradient reaching P_e * gelu(Z) of this MLP.
    g_base = g_ptr + rows[:, None] * stride_gm
    w2_base = w2_ptr + offs_n[None, :].to(tl.int64) * stride_w2k
    d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN], the only accumulator
    for k0 in range(0, N, BLOCK_K):
        k = k0 + offs_k
        g = tl.load(g_base + k[None, :] * stride_gk, mask=m_mask[:, None] & (k[None, :] < N), other=0.0)
        w = tl.load(w2_base + k[:, None] * stride_w2n, mask=n_mask[None, :] & (k[:, None] < N), other=0.0)
        d = tl.dot(g, w, d, input_precision=PREC)
    mask2 = m_mask[:, None] & n_mask[None, :]
    z = tl.load(z_ptr + rows[:, None] * stride_zm + offs_n[None, :], mask=mask2, other=0.0).to(tl.float32)
    p = tl.load(probs_ptr + rows * T + e, mask=m_mask, other=0.0)[:, None]  # [BM, 1]
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    if NEED_DZ:
        dact = cdf + z * (0.3989422804014327 * tl.exp(-0.5 * z * z))  # gelu'(z) = Phi(z) + z phi(z)
        tl.store(dz_ptr + rows[:, None] * stride_dzm + offs_n[None, :], (d * p * dact).to(dz_ptr.dtype.element_ty),
                 mask=mask2)
    act = z * cdf  # gelu(z); z and cdf die here
    if NEED_DP:
        part = tl.sum(tl.where(mask2, d * act, 0.0), axis=1)  # [BM]
        tl.store(dp_ptr + pid_n.to(tl.int64) * M + offs_m, part, mask=m_mask)
    if NEED_S:
        tl.store(s_ptr + rows[:, None] * stride_sm + offs_n[None, :], (act * p).to(s_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _bias_bwd_kernel(g_ptr, b2v_ptr, y_ptr, ye_ptr, probs_ptr, dpe_ptr, pg_ptr,
                     M, N, T, stride_gm, stride_gk, stride_yj, stride_ym,
                     NY: tl.constexpr, HAS_B: tl.constexpr, NEED_DPE: tl.constexpr, NEED_PG: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # One read of G [M, N]: dpe [M, T] = G B2v^T + sum_j [ye_j == t] <G, Y_j>, and the per-block
    # partial P^T G ([T, N] per block, summed in torch: db2_m = (P^T G)[e(m)]).
    pid = tl.program_id(0)
    offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    t_mask = offs_t < T
    p = tl.load(probs_ptr + offs_m[:, None] * T + offs_t[None, :], mask=m_mask[:, None] & t_mask[None, :],
                other=0.0)  # [BM, BT]
    p_t = tl.trans(p)  # [BT, BM]
    acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)  # [BM, BT]
    for k0 in range(0, N, BLOCK_K):
        k = k0 + offs_k
        mk = m_mask[:, None] & (k[None, :] < N)
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + k[None, :] * stride_gk, mask=mk, other=0.0).to(tl.float32)
        if NEED_DPE:
            if HAS_B:
                b = tl.load(b2v_ptr + offs_t[None, :] * N + k[:, None], mask=t_mask[None, :] & (k[:, None] < N),
                            other=0.0)  # [BK, BT] fp32
                acc = tl.dot(g, b, acc, input_precision="ieee")
            for j in tl.static_range(NY):
                y = tl.load(y_ptr + j * stride_yj + offs_m[:, None] * stride_ym + k[None, :], mask=mk,
                            other=0.0).to(tl.float32)
                rs = tl.sum(g * y, axis=1)  # [BM]
                acc += tl.where(offs_t[None, :] == tl.load(ye_ptr + j), rs[:, None], 0.0)
        if NEED_PG:
            pg = tl.dot(p_t, g, input_precision="ieee")  # [BT, BK]
            tl.store(pg_ptr + (pid * T + offs_t[:, None]) * N + k[None, :], pg, mask=t_mask[:, None] & (k[None, :] < N))
    if NEED_DPE:
        tl.store(dpe_ptr + offs_m[:, None] * T + offs_t[None, :], acc, mask=m_mask[:, None] & t_mask[None, :])


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
def _router_backward(h2, probs, lse, dp, gz, need_dl: bool):
    """dW_r ([T, Cv] fp32) and, when H needs a grad, dlogits [M, T]."""
    m, cv = h2.shape
    t = probs.shape[1]
    n_k, n_m = triton.cdiv(cv, SMALL_K), triton.cdiv(m, SMALL_M)
    # ~256 programs in all: enough to fill a GPU, few enough partials to sum cheaply.
    rows = triton.cdiv(n_m, max(1, min(n_m, triton.cdiv(256, n_k)))) * SMALL_M
    split = triton.cdiv(m, rows)
    part = torch.empty(split, t, cv, dtype=torch.float32, device=h2.device)  # [S, T, Cv]
    dl = torch.empty(m, t, dtype=torch.float32, device=h2.device) if need_dl else probs
    record("router bwd", (n_k, split), t, cv, m)
    _router_bwd_kernel[(n_k, split)](h2, probs, dp, lse, gz, part, dl, m, t, cv, rows, h2.stride(0), h2.stride(1),
                                     WRITE_DL=need_dl, BLOCK_M=SMALL_M, BLOCK_T=pow2(t), BLOCK_K=SMALL_K)
    return part.sum(0), (dl if need_dl else None)


def mixture_backward(g_out, g_probs, g_prob_sum, g_lse_sq, h2, wr, w1, b1, w2, b2, probs, lse, z, y,
                     expert_of: Sequence[int], visit: Sequence[bool], keep_y: Sequence[bool],
                     needs: Sequence[bool]) -> list[torch.Tensor | None]:
    """Gradients [d_h, d_wr, then (dw1, db1, dw2, db2) per MLP], None where not needed."""
    m, cv = h2.shape
    t, c, n, num_mlps = wr.shape[0], w1[0].shape[0], w2[0].shape[0], len(w1)
    dev, f32 = h2.device, torch.float32
    need_h, need_wr = needs[0], needs[1]
    flags = [needs[2 + 4 * i:6 + 4 * i] for i in range(num_mlps)]  # (w1, b1, w2, b2) per MLP
    need_dp = need_h or need_wr
    g = g_out.contiguous()  # [M, N]
    visited = [i for i in range(num_mlps) if visit[i]]
    kept = [i for i in range(num_mlps) if keep_y[i]]
    if need_dp and any(not visit[i] and not keep_y[i] for i in range(num_mlps)):
        raise RuntimeError("CT-MoA backward: dP needs every MLP, but the forward kept neither Z nor Y of some "
                           "(requires_grad changed between forward and backward?)")

    dz, s, dp_mlp = {}, {}, {}
    tile = pick_tile("bwd", h2.dtype, m)
    grid = tiles_grid(m, c, tile)
    nb_n = grid[0] // triton.cdiv(m, tile.bm)
    for zi, i in enumerate(visited):
        fw1, fb1, fw2, _ = flags[i]
        want_dz, want_s = fw1 or fb1 or need_h, fw2
        if not (want_dz or want_s or need_dp):
            continue
        dz_i = torch.empty(m, c, dtype=h2.dtype, device=dev) if want_dz else None  # [M, C]
        s_i = torch.empty(m, c, dtype=h2.dtype, device=dev) if want_s else None  # [M, C]
        dp_i = torch.empty(nb_n, m, dtype=f32, device=dev) if need_dp else None  # [NB, M] partials
        z_i = z[:, zi * c:(zi + 1) * c]
        for x in (g, z_i, dz_i, s_i):  # tile-local offsets are int32 (the kernel's comment)
            if x is not None and tile.bm * x.stride(0) >= 2**31:
                raise ValueError(f"CT-MoA backward: row stride {x.stride(0)} too large for int32 tile offsets")
        record("bwd D", grid, m, c, n, tile)
        _mix_bwd_kernel[grid](g, w2[i], z_i, probs, dz_i if want_dz else g, s_i if want_s else g,
                              dp_i if need_dp else probs, m, c, n, t, expert_of[i], g.stride(0), g.stride(1),
                              w2[i].stride(0), w2[i].stride(1), z_i.stride(0),
                              dz_i.stride(0) if want_dz else 0, s_i.stride(0) if want_s else 0,
                              NEED_DP=need_dp, NEED_DZ=want_dz, NEED_S=want_s, PREC=precision(h2.dtype),
                              BLOCK_M=tile.bm, BLOCK_N=tile.bn, BLOCK_K=tile.bk, GROUP_M=tile.group_m,
                              num_warps=tile.warps, num_stages=tile.stages)
        dz[i], s[i] = dz_i, s_i
        if need_dp:
            dp_mlp[i] = dp_i.sum(0)  # [M]

    b2v = per_expert_bias(b2, visited, expert_of, t, n, h2) if need_dp else None  # [T, N] fp32
    need_dpe = need_dp and (b2v is not None or bool(kept))
    need_pg = any(f[3] for f in flags)
    dpe = pg = None
    if need_dpe or need_pg:
        nb_m = triton.cdiv(m, SMALL_M)
        dpe = torch.empty(m, t, dtype=f32, device=dev) if need_dpe else None  # [M, T]
        pg_part = torch.empty(nb_m, t, n, dtype=f32, device=dev) if need_pg else None  # [NB, T, N]
        ye = int_tensor(tuple(expert_of[i] for i in kept), str(dev)) if kept else probs
        _bias_bwd_kernel[(nb_m,)](g, b2v if b2v is not None else probs, y if kept else g, ye, probs,
                                  dpe if need_dpe else probs, pg_part if need_pg else probs, m, n, t,
                                  g.stride(0), g.stride(1), y.stride(0) if kept else 0, y.stride(1) if kept else 0,
                                  NY=len(kept) if need_dpe else 0, HAS_B=b2v is not None, NEED_DPE=need_dpe,
                                  NEED_PG=need_pg, BLOCK_M=SMALL_M, BLOCK_T=pow2(t), BLOCK_K=SMALL_K)
        pg = pg_part.sum(0) if need_pg else None  # [T, N] = P^T G

    d_h = d_wr = dl = None
    if need_dp:
        # [M, T]: the MLPs of each expert summed in a fixed order (no atomics).
        dp = dpe if dpe is not None else torch.zeros(m, t, dtype=f32, device=dev)
        for i in visited:
            dp[:, expert_of[i]] += dp_mlp[i]
        if g_probs is not None:
            dp = dp + g_probs.reshape(m, t)
        if g_prob_sum is not None:
            dp = dp + g_prob_sum.float()[None, :]
        gz = (2.0 * g_lse_sq.float()).reshape(1) if g_lse_sq is not None else torch.zeros(1, dtype=f32, device=dev)
        dwr32, dl = _router_backward(h2, probs, lse, dp.contiguous(), gz, need_dl=need_h)
        d_wr = dwr32.to(wr.dtype) if need_wr else None
    if need_h:  # every MLP is visited and has a dZ
        acc = dl @ wr.float()  # [M, Cv] fp32
        for i in range(num_mlps):
            record("torch dH", None, m, cv, c)
            acc += torch.matmul(dz[i], w1[i]).float()
        d_h = acc.to(h2.dtype)

    grads: list[torch.Tensor | None] = [d_h, d_wr]
    for i, (fw1, fb1, fw2, fb2) in enumerate(flags):
        if fw1:
            record("torch dW1", None, c, cv, m)
        if fw2:
            record("torch dW2", None, n, c, m)
        grads += [dz[i].t() @ h2 if fw1 else None,  # [C, Cv]
                  dz[i].sum(0, dtype=f32).to(h2.dtype) if fb1 else None,  # [C]
                  g.t() @ s[i] if fw2 else None,  # [N, C]
                  pg[expert_of[i]].to(h2.dtype, copy=True) if fb2 else None]  # [N], own storage (op outputs may not alias)
    return grads
