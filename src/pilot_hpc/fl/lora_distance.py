"""Distances between clients' LoRA defined on the products delta W = s B A, never formed.

For one LoRA module, client k holds A_k [r_k, in], B_k [out, r_k] and peft's scaling
s_k = lora_alpha / r_k; its change to the layer is s_k B_k A_k [out, in]. Between two
clients,

    ||s_k B_k A_k - s_i B_i A_i||_F^2 = G_kk + G_ii - 2 G_ki,
    G_ki = s_k s_i <B_k A_k, B_i A_i>_F = s_k s_i tr((B_k^T B_i)(A_i A_k^T)),

and summed over the modules this is the squared distance of the clients' whole LoRA
products. G is a Gram matrix, so ATA's plan (aggregate.distances_from_gram) uses it as
it uses the flat parameters' Gram matrix. It is defined whatever the ranks (a rank
component that is zero in A or B adds nothing), which is what makes ATA rank-agnostic.

Cost per module: with the K clients' factors stacked, M_A = A A^T and M_B = B^T B are
[sum r_k]^2 Gram matrices of the rank components, and G_ki is the sum of the
elementwise product of their (k, i) blocks (tr(X Y) = sum(X * Y^T), and M_A is
symmetric): (sum r)^2 (in + out) multiply-adds, r times the flat Gram's K^2 r (in + out).

`ProductGram` builds G as the personal rows stream in column chunks (fl/stream.py): it
assembles one module's A and B of the K clients at a time, adds its contribution and
drops them, so the server never holds the K whole rows.

Also here: FLoRA's stacking (the aggregated product of stacked factors is the weighted
sum of the clients' products, exactly) and HetLoRA's zero padding (a client of rank r_k
in a model of rank R keeps its components r_k..R at zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# Parameter-name markers of peft's LoRA factors (`...q_proj.lora_A.default.weight`).
A_MARK, B_MARK = ".lora_A.", ".lora_B."


@dataclass(frozen=True)
class ModuleSpan:
    """Where one LoRA module's factors sit in the flat personal row."""

    name: str  # the A parameter's name with the marker removed (the module and adapter)
    a_off: int
    a_shape: tuple[int, int]  # (r, in)
    b_off: int
    b_shape: tuple[int, int]  # (out, r)
    scale: float  # peft's scaling of this module (lora_alpha / r)

    @property
    def rank(self) -> int:
        return self.a_shape[0]

    @property
    def end(self) -> int:
        """One past the last column of the module's factors."""
        return max(self.a_off + self.a_shape[0] * self.a_shape[1], self.b_off + self.b_shape[0] * self.b_shape[1])


def layout(named: Sequence[tuple[str, torch.Tensor]], scales: dict[str, float] | float) -> list[ModuleSpan]:
    """The modules of a flat row made of `named` (name, tensor) in row order, each A paired
    with the B of the same module and adapter. scales: one scaling for all, or per span
    name. Refuses a row with a non-LoRA tensor or an unpaired factor."""
    offsets, off = {}, 0
    for name, t in named:
        offsets[name] = (off, tuple(t.shape))
        off += t.numel()
    spans = []
    for name, (a_off, a_shape) in offsets.items():
        if A_MARK not in name:
            if B_MARK not in name:
                raise ValueError(f"lora_distance.layout: {name!r} is not a LoRA factor (lora_A / lora_B)")
            continue
        b_name = name.replace(A_MARK, B_MARK)
        if b_name not in offsets:
            raise ValueError(f"lora_distance.layout: {name!r} has no {b_name!r} in the row")
        b_off, b_shape = offsets[b_name]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise ValueError(f"lora_distance.layout: {name!r} {a_shape} and {b_name!r} {b_shape} are not the "
                             "factors [r, in], [out, r] of one module")
        key = name.replace(A_MARK, ".")
        scale = scales if isinstance(scales, (int, float)) else scales[key]
        spans.append(ModuleSpan(key, a_off, a_shape, b_off, b_shape, float(scale)))
    n_b = sum(B_MARK in n for n in offsets)
    if n_b != len(spans):
        raise ValueError(f"lora_distance.layout: {n_b} lora_B factors but {len(spans)} lora_A ones")
    return sorted(spans, key=lambda s: min(s.a_off, s.b_off))


def model_layout(pm) -> list[ModuleSpan]:
    """The spans of Pilot's personal row (pm.lora_named_parameters(), in that order), each
    with its module's scaling as peft applies it (module.scaling[adapter])."""
    scales = {}
    for mod_name, mod in pm.model.named_modules():
        if hasattr(mod, "lora_A") and isinstance(getattr(mod, "scaling", None), dict):
            for adapter, s in mod.scaling.items():
                scales[f"{mod_name}.{adapter}.weight"] = float(s)
    return layout(pm.lora_named_parameters(), scales)


def _pad_rank(factors: Sequence[torch.Tensor], dim: int, rank: int) -> torch.Tensor:
    """Stacks the clients' factors, zero-padded along `dim` (the rank) to `rank`."""
    out = []
    for f in factors:
        pad = rank - f.shape[dim]
        if pad:
            shape = list(f.shape)
            shape[dim] = pad
            f = torch.cat([f, f.new_zeros(shape)], dim=dim)
        out.append(f)
    return torch.stack(out)


def module_gram(a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One module's product Gram matrix G_ki = s_k s_i <B_k A_k, B_i A_i>_F -> [K, K] float64.

    a [K, r, in], b [K, out, r] (clients with a smaller rank zero-padded), scales [K].
    The two rank-component Gram matrices are computed in the factors' dtype, their block
    sums in float64."""
    k, r, _ = a.shape
    flat_a = a.reshape(k * r, -1)
    flat_b = b.transpose(1, 2).contiguous().reshape(k * r, -1)
    g = torch.zeros(k, k, dtype=torch.float64, device=a.device)
    # G is symmetric: client k's rank components against those of clients k.. only, one
    # [r, (K - k) r] product per client and factor, K(K + 1) / 2 of the K^2 blocks.
    for c in range(k):
        rows = slice(c * r, (c + 1) * r)
        m_a = flat_a[rows] @ flat_a[c * r:].T  # [r, (K - c) r]
        m_b = flat_b[rows] @ flat_b[c * r:].T
        g[c, c:] = (m_a.to(torch.float64) * m_b.to(torch.float64)).view(r, k - c, r).sum(dim=(0, 2))
    g = torch.triu(g) + torch.triu(g, diagonal=1).T
    s = scales.to(dtype=torch.float64, device=g.device)
    return g * s[:, None] * s[None, :]


def product_gram(modules: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]],
                 scales: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
    """The product Gram matrix summed over modules -> [K, K] float64.

    modules: per module (the K clients' A_k [r_k, in], the K clients' B_k [out, r_k]);
    scales[m][k]: client k's scaling in module m (lora_alpha / r_k under peft)."""
    total = None
    for m, (a_list, b_list) in enumerate(modules):
        rank = max(a.shape[0] for a in a_list)
        g = module_gram(_pad_rank(a_list, 0, rank), _pad_rank(b_list, 1, rank),
                        torch.as_tensor(scales[m], dtype=torch.float64))
        total = g if total is None else total + g
    return total


def product_sq_distances(modules, scales) -> torch.Tensor:
    """[K, K] float64: ||dW_k - dW_i||^2 summed over modules (dW = s B A), from the Gram."""
    g = product_gram(modules, scales)
    sq = g.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min(0.0)
    d2.fill_diagonal_(0.0)
    return d2


class ModuleFactors:
    """Reassembles the LoRA modules of K personal rows that arrive in column chunks, and
    hands each module's factors to `module()` as soon as both are complete.

    feed(block [K, c], col) with col the block's first column in the personal row; the
    chunks must come in order and cover the row. A factor that straddles chunks is
    assembled in a [K, numel] buffer; once a module has both factors they are handed on
    and dropped, so at most one module (plus the factor being assembled) of the K
    clients is held. Subclasses: ProductGram (ATA's distances on products) and
    fl/stack.py's StackedFactors (FLoRA's stacking)."""

    def __init__(self, spans: Sequence[ModuleSpan], k: int, device: torch.device | str = "cpu"):
        self.spans, self.k, self.device = list(spans), k, torch.device(device)
        # (start, numel, span index, "a" | "b") of every factor, in row order
        self.factors = sorted([(s.a_off, s.a_shape[0] * s.a_shape[1], i, "a") for i, s in enumerate(spans)] +
                              [(s.b_off, s.b_shape[0] * s.b_shape[1], i, "b") for i, s in enumerate(spans)])
        self.next = 0  # the first factor not yet complete
        self.filling: dict[int, torch.Tensor] = {}  # factor index -> [K, numel] buffer being assembled
        self.done: dict[int, dict[str, torch.Tensor]] = {}  # span index -> its complete factors
        self.seen = 0  # columns fed so far

    def feed(self, block: torch.Tensor, col: int) -> None:
        if col != self.seen:
            raise ValueError(f"{type(self).__name__}: chunk at column {col}, expected {self.seen} (chunks in order)")
        c = block.shape[1]
        self.seen += c
        f = self.next
        while f < len(self.factors):
            start, numel, span, role = self.factors[f]
            if start >= col + c:
                break
            lo, hi = max(start, col), min(start + numel, col + c)
            if lo == start and hi == start + numel:  # the whole factor in this chunk: no copy
                self._complete(f, block[:, lo - col:hi - col])
            else:
                buf = self.filling.get(f)
                if buf is None:
                    buf = self.filling[f] = torch.empty(self.k, numel, dtype=block.dtype, device=self.device)
                buf[:, lo - start:hi - start].copy_(block[:, lo - col:hi - col])
                if hi == start + numel:
                    self._complete(f, self.filling.pop(f))
                else:
                    break  # the factor goes on in the next chunk
            f += 1
        self.next = f

    def _complete(self, f: int, flat: torch.Tensor) -> None:
        _, _, span, role = self.factors[f]
        s = self.spans[span]
        shape = s.a_shape if role == "a" else s.b_shape
        got = self.done.setdefault(span, {})
        work = torch.float64 if flat.dtype == torch.float64 else torch.float32
        # A copy: a whole factor arrives as a view of the exchange's receive buffer, which
        # the next chunk overwrites while this factor may wait for its module's other one.
        got[role] = flat.to(device=self.device, dtype=work, copy=True).reshape(self.k, *shape)
        if len(got) == 2:
            del self.done[span]
            self.module(s, got["a"], got["b"])

    def module(self, span: ModuleSpan, a: torch.Tensor, b: torch.Tensor) -> None:
        """One module complete: a [K, r, in], b [K, out, r] of the K clients."""
        raise NotImplementedError

    def check_complete(self) -> None:
        if self.filling or self.done or self.next != len(self.factors):
            raise RuntimeError(f"{type(self).__name__}: the row ended at column {self.seen} with modules incomplete")


class ProductGram(ModuleFactors):
    """The product Gram matrix of K personal rows that arrive in column chunks (each
    module's contribution added as it completes, ModuleFactors). Scaling: the module's,
    the same for every client (under zero_pad every client holds the model's rank R and
    its scaling alpha / R)."""

    def __init__(self, spans: Sequence[ModuleSpan], k: int, device: torch.device | str = "cpu"):
        super().__init__(spans, k, device)
        self.gram = torch.zeros(k, k, dtype=torch.float64, device=self.device)

    def module(self, span: ModuleSpan, a: torch.Tensor, b: torch.Tensor) -> None:
        scales = torch.full((self.k,), span.scale, dtype=torch.float64)
        self.gram += module_gram(a, b, scales).to(self.device)

    def result(self) -> torch.Tensor:
        self.check_complete()
        return self.gram


# ---------------------------------------------------------------------------- ranks


def stack_factors(a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                  weights: Sequence[float], scales: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking: (A [sum r_k, in], B [out, sum r_k]) with
    B A = sum_k w_k s_k B_k A_k exactly (the weights and scalings go into B's blocks), so
    the aggregate of clients of any ranks is their weighted product, with no cross terms."""
    a = torch.cat(list(a_list), dim=0)
    b = torch.cat([w * s * bk for w, s, bk in zip(weights, scales, b_list)], dim=1)
    return a, b


def beyond_rank_mask(spans: Sequence[ModuleSpan], width: int, rank: int) -> torch.Tensor:
    """[width] bool over a personal row: True at the components a client of rank `rank`
    does not have (A's rows rank.. and B's columns rank.. of every module)."""
    mask = torch.zeros(width, dtype=torch.bool)
    for s in spans:
        r, n_in = s.a_shape
        if rank >= r:
            continue
        mask[s.a_off + rank * n_in:s.a_off + r * n_in] = True
        out = s.b_shape[0]
        mask[s.b_off:s.b_off + out * r].view(out, r)[:, rank:] = True
    return mask


def truncate_(named: Sequence[tuple[str, torch.Tensor]], rank: int) -> None:
    """zero_pad, in place: zeroes the rank components `rank`.. of every LoRA factor (A's
    rows, B's columns). With both zero, their gradients are zero too (dL/dA_j involves
    B's column j, dL/dB_j A's row j), and AdamW (weight decay included) and gradient
    clipping keep zero at zero, so local training never revives them."""
    with torch.no_grad():
        for name, p in named:
            if A_MARK in name:
                p[rank:].zero_()
            elif B_MARK in name:
                p[:, rank:].zero_()


def own_rank(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """A peft adapter's tensors at rank `rank`: A's first rows, B's first columns (export
    of a zero_pad client: the components beyond its rank are zero)."""
    out = {}
    for name, t in tensors.items():
        if "lora_A" in name:
            t = t[:rank]
        elif "lora_B" in name:
            t = t[:, :rank]
        out[name] = t.contiguous()
    return out
