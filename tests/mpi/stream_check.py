"""Run under `mpiexec -n W`: the streamed exchange equals the one-shot aggregation.

Every rank regenerates all K clients' updates from a seed, so each can compute the
unchunked reference (`Strategy.aggregate` on the whole [K, P]) and compare it with what
the streamed exchange delivered to it. Exits 0 when every case passes on every rank.
"""

import sys

import torch

from pilot_hpc.config import load_config
from pilot_hpc.fl.comm import Comm, block_ranges
from pilot_hpc.fl.lora_distance import layout
from pilot_hpc.fl.strategies import get_strategy
from pilot_hpc.fl.stream import StreamedExchange
from pilot_hpc.fl.update import ClientUpdate, Part, Participation

# (name, strategy overrides, K, P_visual, P_text, dtype, bad clients, chunk columns[, clients not selected])
CASES = [
    ("pilot-topm", ["fl.strategy=pilot", "pilot.top_m=2"], 7, 53, 101, torch.float32, [], 17),
    ("pilot-bad-client", ["fl.strategy=pilot", "pilot.top_m=3"], 7, 40, 61, torch.float32, [4], 9),
    ("pilot-same-task", ["fl.strategy=pilot", "pilot.selection=same_task"], 6, 33, 29, torch.float32, [], 8),
    ("pilot-all-bf16", ["fl.strategy=pilot", "pilot.selection=all"], 5, 31, 45, torch.bfloat16, [1], 7),
    ("fedavg-one-chunk", ["fl.strategy=fedavg"], 4, 20, 12, torch.float32, [], 0),
    ("shepherd-empty-visual", ["fl.strategy=shepherd"], 5, 0, 37, torch.float32, [], 5),
    ("fedadam-two-rounds", ["fl.strategy=fedadam", "fedadam.server_lr=0.1"], 6, 19, 23, torch.float32, [2], 6),
    # K = 2: under mpiexec -n 3 a rank (the server itself) hosts no client and sends empty rows.
    ("pilot-empty-rank", ["fl.strategy=pilot", "pilot.top_m=1"], 2, 11, 14, torch.float32, [], 4),
    # Participation: the last clients sit the round out (under mpiexec -n 3 all of the last
    # rank's clients, so that rank sends no bytes at all); ATA and FedAdam over the rest.
    ("pilot-not-selected", ["fl.strategy=pilot", "pilot.top_m=2"], 7, 23, 31, torch.float32, [1], 6, (5, 6)),
    ("fedadam-not-selected", ["fl.strategy=fedadam", "fedadam.server_lr=0.1"], 5, 9, 13, torch.float32, [], 4, (4,)),
    # Two senders, three task rows: the server mixes into a padded chunk; two tasks have
    # no participant (NaN rows).
    ("pilot-fewer-than-tasks", ["fl.strategy=pilot", "pilot.top_m=1"], 4, 12, 17, torch.float32, [], 5, (1, 2)),
    ("fedavg-not-selected-bad", ["fl.strategy=fedavg"], 6, 10, 21, torch.float32, [0], 8, (1, 4, 5)),
    # privacy.where=server: the noise of a column is the same whatever the chunks (and the
    # mean is uniform); FedAdam steps on the noisy mean.
    ("fedavg-server-dp", ["fl.strategy=fedavg", "privacy.where=server", "privacy.noise_multiplier=3"], 5, 13, 40,
     torch.float32, [1], 7, (4,)),
    ("fedadam-server-dp", ["fl.strategy=fedadam", "fedadam.server_lr=0.1", "privacy.where=server",
                           "privacy.noise_multiplier=3"], 4, 9, 30, torch.float32, [], 6),
    # ATA on the LoRA products (PRODUCT_SPANS below), factors straddling the 11-column chunks.
    ("pilot-product", ["fl.strategy=pilot", "pilot.top_m=2", "pilot.distance=product"], 7, 13, 75, torch.float32,
     [3], 11, (6,)),
]

# The personal row of the pilot-product case: three LoRA modules (A [3, in], B [out, 3]) in
# peft's order, 75 values in all; scalings as peft's alpha / r would give them.
PRODUCT_SPANS = layout([(f"m{i}.lora_{f}.default.weight", torch.empty(shape)) for i, (a, b) in
                        enumerate([((3, 5), (4, 3)), ((3, 2), (6, 3)), ((3, 7), (1, 3))])
                        for f, shape in (("A", a), ("B", b))], 16 / 3)


def run_case(comm, name, overrides, k, p_vis, p_txt, dtype, bad, cols, skipped=()) -> None:
    """skipped: clients the aggregator leaves out of the round (not_selected): they send no
    row, and the server's step must equal the one-shot step over the others alone."""
    client_tasks = (["vqa", "caption", "grounding"] * k)[:k]
    metrics = {"vqa": "vqa_accuracy", "caption": "cider", "grounding": "iou@0.5"}
    used = {t: m for t, m in metrics.items() if t in client_tasks}
    cfg = load_config(None, ["pilot.top_m=2"] + overrides + [f"fl.num_clients={k}", f"fl.client_tasks={client_tasks}",
                                                          f"fl.task_metrics={used}"])
    blocks = block_ranges(k, comm.size)
    mine = blocks[comm.rank]
    # chunk_mb giving exactly `cols` columns (0: unchunked)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    chunk_mb = cols * itemsize / 2 ** 20
    streamed, reference = get_strategy(cfg.fl.strategy, cfg).aggregator, get_strategy(cfg.fl.strategy, cfg).aggregator
    gen = torch.Generator().manual_seed(len(name))
    init = {Part.SHARED_BY_TASK: torch.randn(p_vis, generator=gen), Part.PERSONAL: torch.randn(p_txt, generator=gen)}
    if cfg.pilot.distance == "product":
        streamed.spans = reference.spans = PRODUCT_SPANS
    streamed.init_server(init)
    reference.init_server(init)
    selected = torch.ones(k, dtype=torch.bool)
    selected[list(skipped)] = False
    taking_part = selected.nonzero().flatten()
    for round_ in range(2 if name.startswith("fedadam") else 1):
        updates = torch.randn(k, p_vis + p_txt, generator=gen).to(dtype)
        n = torch.randint(3, 20, (k,), generator=gen)
        ref_in = updates.clone()
        ref_in[bad] = float("nan")  # the one-shot reference spots bad rows by their NaN
        ref_in[list(skipped)] = float("nan")  # and a client left out is not in the mean
        ref = reference.aggregate(ref_in[:, :p_vis], ref_in[:, p_vis:], n)
        mine_sent = [c for c in mine if bool(selected[c])]
        sent = []
        for c in mine_sent:
            row = torch.zeros_like(updates[c]) if c in bad else updates[c].clone()  # what a bad client sends
            sent.append(ClientUpdate(client=c, num_samples=int(n[c]), parts={Part.SHARED_BY_TASK: row[:p_vis],
                                                                               Part.PERSONAL: row[p_vis:]},
                                     status=Participation.EXCLUDED_NONFINITE if c in bad else Participation.PARTICIPATED))
        traffic = len(comm.traffic)
        got = StreamedExchange(comm, blocks, torch.device("cpu"), chunk_mb).run(streamed, sent, (p_vis, p_txt), dtype,
                                                                                  selected)
        if not mine_sent and comm.rank != 0:  # every client of this rank sat the round out
            assert all(t.sent == 0 for t in comm.traffic[traffic:]), (name, comm.traffic[traffic:])
        # float32: both sides sum the same <= 7 products per value in another blocking
        # (a few ulp); bf16: the float32 mix is rounded once to bf16 (1 ulp = 2^-8 rel).
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
        torch.testing.assert_close(got.shared, ref.shared, equal_nan=True, **tol, msg=f"{name}: shared")
        torch.testing.assert_close(got.personal, ref.personal[mine_sent], equal_nan=True, **tol,
                                   msg=f"{name}: personal")
        if comm.rank == 0:
            assert got.excluded == bad and ref.excluded == sorted(bad + list(skipped)), \
                (name, got.excluded, ref.excluded)
        # A global model reaches every rank when someone sat out (and only then: the bytes
        # of a full round stay as they were); per-client rows (Pilot) are never spread.
        if streamed.global_personal and skipped:
            torch.testing.assert_close(got.global_personal, ref.personal[int(taking_part[0])], equal_nan=True, **tol,
                                       msg=f"{name}: global personal row")
        else:
            assert got.global_personal is None, name
    assert len(taking_part) > 0
    if name.startswith("fedadam"):
        for key in ("w", "m", "v"):
            if comm.rank == 0:
                torch.testing.assert_close(streamed.state[key], reference.state[key], rtol=1e-5, atol=1e-6)


def main() -> int:
    comm = Comm()
    for case in CASES:
        run_case(comm, *case)
    comm.close()
    print(f"rank {comm.rank}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
