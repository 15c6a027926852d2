"""Server-side aggregation as pure functions on tensors (no MPI, no model).

Updates arrive stacked as U: [K, P] (one flattened update per client, on the
server's device). Every aggregation here is a linear mix of the clients' rows,
out = C @ U, whose coefficients C depend only on the sample counts, the tasks, which
clients are good and (for ATA) the K x K Gram matrix of U. So each one is written
twice over the same coefficient builder: a one-shot function on the whole U (the
reference the tests pin), and a coefficient matrix that the streamed exchange
(pilot_hpc.fl.stream) applies to U chunk by chunk. Coefficients are float64; the
mixes run in float32 (or the updates' dtype when that is wider) and return the
updates' dtype. A NaN coefficient row means "no result for this row".
"""

from __future__ import annotations

import torch

# Columns per Gram-matrix chunk: bounds the float64 copy to K x 4M x 8 bytes.
GRAM_CHUNK = 1 << 22


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mix(coef: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """coef [R, K] (float64) @ updates [K, P] -> [R, P] in the updates' dtype."""
    work = work_dtype(updates.dtype)
    return (coef.to(device=updates.device, dtype=work) @ updates.to(work)).to(updates.dtype)


def zero_bad_rows(updates: torch.Tensor, good: torch.Tensor | None) -> torch.Tensor:
    """The bad clients' rows as zeros: their coefficients are 0, but 0 * NaN is NaN."""
    if good is None or bool(good.all()):
        return updates
    return torch.where(good.to(updates.device)[:, None], updates,
                       torch.zeros((), dtype=updates.dtype, device=updates.device))


def mix(coef: torch.Tensor, updates: torch.Tensor, good: torch.Tensor | None = None) -> torch.Tensor:
    """C @ U with the rows of bad clients read as zeros -> [R, P]."""
    return _mix(coef, zero_bad_rows(updates, good))


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


def task_aware_coefficients(n: torch.Tensor, tasks: torch.Tensor, num_tasks: int,
                            good: torch.Tensor | None = None) -> torch.Tensor:
    """[T, K]: row t holds n_k / sum_{j in K_t} n_j for the (good) clients k of task t.

    Without a `good` mask a task with no client is an error; with one, a task left
    without any good client gets a NaN row (its clients keep the adapter they have).
    """
    coef = torch.zeros(num_tasks, len(n), dtype=torch.float64)
    tasks = tasks.cpu()
    for t in range(num_tasks):
        members = (tasks == t) if good is None else (tasks == t) & good.cpu()
        members = members.nonzero().flatten()
        if members.numel() == 0:
            if good is None:
                raise ValueError(f"task {t} has no client: cannot aggregate its adapter")
            coef[t] = float("nan")
            continue
        coef[t, members] = sample_weights(n[members])
    return coef


def task_aware_average(updates: torch.Tensor, n: torch.Tensor, tasks: torch.Tensor, num_tasks: int,
                       good: torch.Tensor | None = None) -> torch.Tensor:
    """Theta_t = sum_{k in K_t} n_k / sum_{j in K_t} n_j * U_k for every task t -> [T, P]."""
    return mix(task_aware_coefficients(n, tasks, num_tasks, good), updates, good)


def average_coefficients(n: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """[K]: FedAvg's weights n_k / sum_j n_j over the good clients (0 for the others)."""
    w = torch.zeros(len(n), dtype=torch.float64)
    keep = good.cpu().nonzero().flatten()
    w[keep] = sample_weights(n[keep])
    return w


def gram_matrix(updates: torch.Tensor, chunk: int = GRAM_CHUNK) -> torch.Tensor:
    """G = U U^T accumulated in float64 over column chunks -> [K, K]."""
    k = updates.shape[0]
    gram = torch.zeros(k, k, dtype=torch.float64, device=updates.device)
    for start in range(0, updates.shape[1], chunk):
        block = updates[:, start:start + chunk].to(torch.float64)
        gram += block @ block.T
    return gram


def distances_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """d_ki = ||U_k - U_i||_2 = sqrt(|a|^2 + |b|^2 - 2 a.b) -> [K, K] float64."""
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)
    d2.fill_diagonal_(0.0)
    return d2.sqrt()


def pairwise_distances(updates: torch.Tensor) -> torch.Tensor:
    """Distances between the clients' updates from one Gram matrix -> [K, K] float64."""
    return distances_from_gram(gram_matrix(updates))


def nearest_clients(dist: torch.Tensor, top_m: int) -> list[list[int]]:
    """ATA's K_m: per row of [K, K] distances, the M nearest other clients, ordered by
    (distance, index) so that ties resolve the same way everywhere."""
    k = dist.shape[0]
    return [sorted((i for i in range(k) if i != row), key=lambda i: (float(dist[row, i]), i))[:top_m]
            for row in range(k)]


def ata_coefficients(dist: torch.Tensor, n: torch.Tensor, top_m: int, eps: float = 1e-12) -> torch.Tensor:
    """Mixing matrix A [K, K] of adaptive text-adapter aggregation (docs/method.md, ATA).

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
    for row, nearest in enumerate(nearest_clients(dist, top_m)):
        inv = 1.0 / dist[row, nearest].clamp_min(eps)
        w = inv / inv.sum()
        s = n[nearest].sum()
        denom = n[row] + s
        coef[row, row] = n[row] / denom
        coef[row, nearest] = (s / denom) * w
    return coef


def ata_mixing(gram: torch.Tensor, n: torch.Tensor, top_m: int, eps: float = 1e-12,
               good: torch.Tensor | None = None) -> torch.Tensor:
    """[K, K] mixing matrix of ATA from the Gram matrix of the updates.

    With a `good` mask, ATA runs among the good clients only (M shrinks to at most
    their number minus one); excluded clients get NaN rows (they keep their own LoRA)
    and zero columns, so no good client's result depends on an excluded one.
    """
    k = gram.shape[0]
    if good is None:
        return ata_coefficients(distances_from_gram(gram.cpu()), n, top_m, eps)
    rows = good.cpu().nonzero().flatten()
    coef = torch.zeros(k, k, dtype=torch.float64)
    coef[~good.cpu()] = float("nan")
    if rows.numel() == 1:
        coef[rows, rows] = 1.0
    elif rows.numel() > 1:
        sub = gram.cpu()[rows][:, rows]
        coef[rows[:, None], rows[None, :]] = ata_coefficients(distances_from_gram(sub), n[rows],
                                                              min(top_m, rows.numel() - 1), eps)
    return coef


def ata_aggregate(updates: torch.Tensor, n: torch.Tensor, top_m: int, eps: float = 1e-12,
                  good: torch.Tensor | None = None) -> torch.Tensor:
    """Each client's personalised LoRA -> [K, P] (see ata_mixing for the `good` mask)."""
    updates = zero_bad_rows(updates, good)
    return _mix(ata_mixing(gram_matrix(updates), n, top_m, eps, good), updates)
