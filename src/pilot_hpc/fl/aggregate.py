"""Server-side aggregation as pure functions on tensors (no MPI, no model).

Updates arrive stacked as U: [K, P] (one flattened update per client, on the
server's device). Weights are computed in float64; the mixes run in float32 (or the
updates' dtype when that is wider) and return the updates' dtype.
"""

from __future__ import annotations

import torch

# Columns per Gram-matrix chunk: bounds the float64 copy to K x 4M x 8 bytes.
GRAM_CHUNK = 1 << 22


def _mix(coef: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """coef [R, K] (float64) @ updates [K, P] -> [R, P] in the updates' dtype."""
    work = torch.float64 if updates.dtype == torch.float64 else torch.float32
    return (coef.to(work) @ updates.to(work)).to(updates.dtype)


def sample_weights(n: torch.Tensor) -> torch.Tensor:
    n = n.to(torch.float64)
    if (n < 0).any() or n.sum() <= 0:
        raise ValueError(f"sample counts must be >= 0 with a positive sum, got {n.tolist()}")
    return n / n.sum()


def weighted_average(updates: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """FedAvg: sum_k (n_k / sum_j n_j) * U_k -> [P]."""
    return _mix(sample_weights(n)[None, :].to(updates.device), updates)[0]


def finite_rows(updates: torch.Tensor) -> torch.Tensor:
    """[K] bool: the clients whose update holds no NaN/Inf (the others are excluded)."""
    return torch.isfinite(updates).all(dim=1).cpu()


def task_aware_average(updates: torch.Tensor, n: torch.Tensor, tasks: torch.Tensor, num_tasks: int,
                       good: torch.Tensor | None = None) -> torch.Tensor:
    """Theta_t = sum_{k in K_t} n_k / sum_{j in K_t} n_j * U_k for every task t -> [T, P].

    With a `good` mask only those clients count; a task left without any good client
    gets a NaN row (its clients keep the adapter they have).
    """
    coef = torch.zeros(num_tasks, updates.shape[0], dtype=torch.float64)
    empty = []
    for t in range(num_tasks):
        members = (tasks == t) if good is None else (tasks == t) & good
        members = members.nonzero().flatten()
        if members.numel() == 0:
            if good is None:
                raise ValueError(f"task {t} has no client: cannot aggregate its adapter")
            empty.append(t)
            continue
        coef[t, members] = sample_weights(n[members])
    # Excluded rows may hold NaN, and 0 * NaN = NaN: mix only the good rows.
    rows = torch.arange(updates.shape[0]) if good is None else good.nonzero().flatten()
    out = _mix(coef[:, rows].to(updates.device), updates[rows.to(updates.device)])
    if empty:
        out[empty] = float("nan")
    return out


def gram_matrix(updates: torch.Tensor, chunk: int = GRAM_CHUNK) -> torch.Tensor:
    """G = U U^T accumulated in float64 over column chunks -> [K, K]."""
    k = updates.shape[0]
    gram = torch.zeros(k, k, dtype=torch.float64, device=updates.device)
    for start in range(0, updates.shape[1], chunk):
        block = updates[:, start:start + chunk].to(torch.float64)
        gram += block @ block.T
    return gram


def pairwise_distances(updates: torch.Tensor) -> torch.Tensor:
    """d_ki = ||U_k - U_i||_2 from one Gram matrix: |a|^2 + |b|^2 - 2 a.b -> [K, K] float64."""
    gram = gram_matrix(updates)
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)
    d2.fill_diagonal_(0.0)
    return d2.sqrt()


def ata_coefficients(dist: torch.Tensor, n: torch.Tensor, top_m: int, eps: float = 1e-12) -> torch.Tensor:
    """Mixing matrix A [K, K] of adaptive text-adapter aggregation (METHOD.md, ATA).

    Row k: the M nearest other clients K_m (ties broken by client index) get
    w_ki = (1/d_ki) / sum_{j in K_m} 1/d_kj, with d floored at eps so that a zero
    distance gives a finite (dominant) weight; then, with S = sum_{j in K_m} n_j,
    A[k, k] = n_k / (n_k + S) and A[k, i] = S / (n_k + S) * w_ki. Rows sum to 1.
    """
    k = dist.shape[0]
    if not 1 <= top_m < k:
        raise ValueError(f"ATA needs 1 <= M < K, got M={top_m}, K={k}")
    n = n.to(torch.float64).cpu()
    dist = dist.to(torch.float64).cpu()
    coef = torch.zeros(k, k, dtype=torch.float64)
    for row in range(k):
        others = [i for i in range(k) if i != row]
        # Stable order by (distance, index): deterministic under ties.
        nearest = sorted(others, key=lambda i: (float(dist[row, i]), i))[:top_m]
        inv = 1.0 / dist[row, nearest].clamp_min(eps)
        w = inv / inv.sum()
        s = n[nearest].sum()
        denom = n[row] + s
        coef[row, row] = n[row] / denom
        coef[row, nearest] = (s / denom) * w
    return coef


def ata_aggregate(updates: torch.Tensor, n: torch.Tensor, top_m: int, eps: float = 1e-12,
                  good: torch.Tensor | None = None) -> torch.Tensor:
    """Each client's personalised LoRA -> [K, P].

    With a `good` mask, ATA runs among the good clients only (M shrinks to at most
    their number minus one); excluded clients get NaN rows (they keep their own LoRA),
    so no good client's result depends on an excluded one.
    """
    if good is None:
        coef = ata_coefficients(pairwise_distances(updates), n, top_m, eps)
        return _mix(coef.to(updates.device), updates)
    rows = good.nonzero().flatten()
    out = torch.full_like(updates, float("nan"))
    if rows.numel() == 1:
        out[rows] = updates[rows]
    elif rows.numel() > 1:
        out[rows.to(updates.device)] = ata_aggregate(updates[rows.to(updates.device)], n[rows],
                                                     min(top_m, rows.numel() - 1), eps)
    return out
