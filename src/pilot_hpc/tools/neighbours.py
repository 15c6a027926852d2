"""ATA's nearest clients on flat LoRA parameters against those on LoRA products, from a
run's checkpoint:

    python -m pilot_hpc.tools.neighbours --run RUN_DIR [--round R] [--top-m M]

Reads every client's LoRA from the complete checkpoint of round R (default: the newest),
ranks the other clients by the flat-parameter distance (pilot.distance=params) and by the
product distance (pilot.distance=product, fl/lora_distance.py; float64 here) and prints,
per client, the M nearest under each and whether the sets differ. A checkpoint holds
the LoRA after the round's mix, not the rows the server mixed: the comparison says how
the two distances order a set of trained LoRA, not which neighbours that round chose.
"""

from __future__ import annotations

import argparse

import torch

from pilot_hpc.fl import aggregate
from pilot_hpc.fl.lora_distance import A_MARK, B_MARK, product_gram


def client_lora(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(the flat row in state order, [(A, B) per module]) of one client's state (its `lora.` keys)."""
    keys = [k for k in state if k.startswith("lora.")]
    flat = torch.cat([state[k].double().flatten() for k in keys])
    pairs = [(state[k].double(), state[k.replace(A_MARK, B_MARK)].double()) for k in keys if A_MARK in k]
    return flat, pairs


def compare(states: list[dict[str, torch.Tensor]], m: int, scale: float) -> dict:
    rows, modules = zip(*(client_lora(s) for s in states))
    flat = aggregate.pairwise_distances(torch.stack(rows))
    per_module = [([c[j][0] for c in modules], [c[j][1] for c in modules]) for j in range(len(modules[0]))]
    prod = aggregate.distances_from_gram(product_gram(per_module, [[scale] * len(states)] * len(per_module)))
    on_params, on_products = aggregate.nearest_clients(flat, m), aggregate.nearest_clients(prod, m)
    return {"params": on_params, "product": on_products,
            "differ": [k for k in range(len(states)) if set(on_params[k]) != set(on_products[k])]}


def main(argv: list[str] | None = None) -> int:
    from pilot_hpc.checkpoint import read
    from pilot_hpc.export import find_checkpoint, run_config

    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.tools.neighbours", description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--round", type=int, default=None)
    ap.add_argument("--top-m", type=int, default=None, help="default: the run's pilot.top_m")
    a = ap.parse_args(argv)
    path = find_checkpoint(a.run, a.round)
    ck = read(path)
    cfg = run_config(ck.attrs, path)
    m = a.top_m or cfg.pilot.top_m
    k = cfg.fl.num_clients
    # Every client holds the model's rank (padded under zero_pad), so one scaling for all.
    got = compare([ck.clients[c].state for c in range(k)], m, cfg.model.lora_alpha / cfg.model.lora_r)
    print(f"{path} (round {ck.round}, {k} clients, M = {m})")
    for c in range(k):
        mark = "differs" if c in got["differ"] else "same"
        print(f"  client {c}: params {got['params'][c]}  product {got['product'][c]}  {mark}")
    print(f"clients whose top-{m} set differs: {len(got['differ'])} of {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
