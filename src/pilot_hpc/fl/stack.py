"""FLoRA's stacking (fl.lora_rank_rule=stack) for the global strategies, FedAvg and FedProx.

Client k of rank r_k holds, per LoRA module, A_k [r_k, in] and B_k [out, r_k] (stored padded
to the model's rank R = model.lora_r, components r_k..R zero, as under zero_pad) and
changes the layer by s B_k A_k, s = lora_alpha / R the scaling peft applies to the padded
adapter. Averaging the factors (FedAvg, zero_pad) gives mean(B) mean(A), which is not the
mean of the products. Stacking the factors along the rank,

    A_stack = [A_1; ...; A_K]  [sum r_k, in],   B_stack = [w_1 s B_1, ..., w_K s B_K]  [out, sum r_k],

gives B_stack A_stack = sum_k w_k s B_k A_k exactly (no cross terms), w_k the FedAvg sample
weights of the good participants. That product is only exact once it is merged into the
base weights, W <- W + B_stack A_stack, after which every client's LoRA restarts at B = 0
(the model is then base + merged, whatever A). The base is shared by every client a rank
hosts, so the merge suits a global model (every client gets the same delta) and not Pilot's
per-client mix (each client would need its own dense residual: config.check_lora_ranks).

Per round (fl/stream.py, StreamedExchange.run):
  the personal rows (the LoRA, padded) are gathered chunk by chunk; `StackedFactors`
  reassembles one module at a time (lora_distance.ModuleFactors) and packs its stacked
  factors, each client's own r_k components only, B's blocks scaled by w_k s;
  -> Bcast of the included clients (a [K] mask) and of the packed factors, sum r_k (in + out)
  values per module (encoded float32 bytes, in traffic/rank_RRR.json as tags
  "stack_clients" and "stacked");
  -> every rank, the server included, merges the same bytes with the same float ops
  (`merge`), so W = 1 and W = 3 hold bitwise the same base; each participant then sets
  its B to zero (`restart_`), keeping its A.

A is kept, not re-initialised as FLoRA does: with B = 0 the LoRA's product is zero
whatever A is, so exactness does not need a new A; a kept A is the client's own trained
input projection (a warm start) and it needs no random stream that a resumed run would have
to reproduce. The merged base weights of the LoRA target modules are the strategy's server
state (checkpointed: Aggregator.server_state), so a resumed run and an export hold them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pilot_hpc.errors import CheckpointError
from pilot_hpc.fl import lora_distance
from pilot_hpc.fl.flat import from_wire, to_wire
from pilot_hpc.fl.lora_distance import ModuleSpan

# Server-state keys: "stack_base.<peft module path>", the merged base weight of one LoRA module.
STATE_PREFIX = "stack_base."


@dataclass
class Stacked:
    """What travels down in a round: the included clients (ascending ids), their ranks, and
    per module in row order A_stack [sum r, in] then B_stack [out, sum r] (B scaled), flat."""

    clients: list[int]
    ranks: list[int]
    packed: torch.Tensor


def packed_size(spans: Sequence[ModuleSpan], ranks: Sequence[int]) -> int:
    total = sum(ranks)
    return sum(total * (s.a_shape[1] + s.b_shape[0]) for s in spans)


def merged(weight: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor) -> torch.Tensor:
    """The base weight with the stacked product added: weight + B_stack A_stack (a new tensor)."""
    return weight + (b_stack @ a_stack).to(weight.dtype)


class StackedFactors(lora_distance.ModuleFactors):
    """The server's packer: the K senders' personal rows in column chunks -> the packed
    stacked factors of the included senders (weight > 0: good clients of the round).

    ids [K]: the senders' client ids (row order); weights [K] float64: their FedAvg weights
    (NaN: nobody usable); ranks: every client's rank (config.client_lora_ranks)."""

    def __init__(self, spans: Sequence[ModuleSpan], ids: torch.Tensor, weights: torch.Tensor,
                 ranks: Sequence[int], device: torch.device | str = "cpu"):
        super().__init__(spans, len(ids), device)
        w = weights.to(torch.float64).cpu()
        rows = [j for j in range(len(ids)) if bool(torch.isfinite(w[j])) and float(w[j]) > 0.0]
        self.rows = sorted(rows, key=lambda j: int(ids[j]))  # packed in ascending client id
        self.clients = [int(ids[j]) for j in self.rows]
        self.ranks = [int(ranks[c]) for c in self.clients]
        self.weights = [float(w[j]) for j in self.rows]
        self.pieces: list[torch.Tensor] = []

    def module(self, span: ModuleSpan, a: torch.Tensor, b: torch.Tensor) -> None:
        if not self.rows:
            return
        a_stack, b_stack = lora_distance.stack_factors(
            [a[j, :r] for j, r in zip(self.rows, self.ranks)], [b[j, :, :r] for j, r in zip(self.rows, self.ranks)],
            self.weights, [span.scale] * len(self.rows))
        self.pieces += [a_stack.reshape(-1).cpu(), b_stack.reshape(-1).cpu()]

    def result(self) -> Stacked:
        self.check_complete()
        packed = torch.cat(self.pieces) if self.pieces else torch.zeros(0)
        return Stacked(self.clients, self.ranks, packed)


def broadcast(comm, got: Stacked | None, spans: Sequence[ModuleSpan], ranks: Sequence[int], num_clients: int,
              root: int = 0) -> Stacked:
    """The server's Stacked (None elsewhere) to every rank: the [K] mask of included
    clients, then the packed float32 factors, whose size every rank computes from it."""
    mask = np.zeros(num_clients, dtype=np.int64)
    if got is not None:
        mask[got.clients] = 1
    comm.bcast(mask, tag="stack_clients", root=root)
    clients = [int(c) for c in np.nonzero(mask)[0]]
    own = [int(ranks[c]) for c in clients]
    # float32, the wire dtype that config.check_stack allows (the rows arrive in it)
    buf = to_wire(got.packed.float()) if got is not None else np.empty(packed_size(spans, own), dtype=np.float32)
    comm.bcast(buf, tag="stacked", root=root)
    return Stacked(clients, own, from_wire(buf, torch.float32))


def module_path(span: ModuleSpan) -> str:
    """The peft LoRA layer's path of a span (its name less `.<adapter>.weight`)."""
    return span.name.rsplit(".", 2)[0]


def base_weights(pm, spans: Sequence[ModuleSpan]) -> dict[str, torch.Tensor]:
    """{module path: the live base weight (the peft LoRA layer's base_layer.weight)}."""
    return {module_path(s): pm.model.get_submodule(module_path(s)).get_base_layer().weight for s in spans}


def merge(bases: dict[str, torch.Tensor], spans: Sequence[ModuleSpan], got: Stacked) -> None:
    """Every rank, in place: each module's base weight += B_stack A_stack, module by module
    in row order (the same float ops on every rank)."""
    total = sum(got.ranks)
    if total == 0:
        return
    off = 0
    with torch.no_grad():
        for s in spans:
            n_in, out = s.a_shape[1], s.b_shape[0]
            a = got.packed[off:off + total * n_in].view(total, n_in)
            off += total * n_in
            b = got.packed[off:off + out * total].view(out, total)
            off += out * total
            w = bases[module_path(s)]
            w.copy_(merged(w, a.to(w.device), b.to(w.device)))
    if off != got.packed.numel():
        raise RuntimeError(f"fl.lora_rank_rule=stack: {got.packed.numel()} stacked values, the modules take {off}")


def server_state(bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {STATE_PREFIX + path: w.detach() for path, w in bases.items()}


def load_server_state(bases: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """The merged base weights from a checkpoint into the live model (refused unless the
    checkpoint holds exactly this model's LoRA target modules, in their shapes)."""
    want = {STATE_PREFIX + p for p in bases}
    if set(state) != want:
        raise CheckpointError(f"fl.lora_rank_rule=stack: the checkpoint's server state holds {len(state)} entries "
                              f"but this model has {len(want)} merged LoRA base weights (missing e.g. "
                              f"{sorted(want - set(state))[:2]}, unexpected {sorted(set(state) - want)[:2]}); "
                              "was it written by a run with another fl.lora_rank_rule or model?")
    with torch.no_grad():
        for path, w in bases.items():
            got = state[STATE_PREFIX + path]
            if tuple(got.shape) != tuple(w.shape):
                raise CheckpointError(f"fl.lora_rank_rule=stack: merged base weight of {path} has shape "
                                      f"{tuple(got.shape)} in the checkpoint, {tuple(w.shape)} in the model")
            w.copy_(got.to(device=w.device, dtype=w.dtype))


def restart_(pm) -> None:
    """After the merge: the hosted client's B factors to zero (its LoRA adds nothing on top
    of the merged base; A kept, see the module docstring)."""
    with torch.no_grad():
        for name, p in pm.lora_named_parameters():
            if lora_distance.B_MARK in name:
                p.zero_()
