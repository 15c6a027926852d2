"""The DeepSpeed local-training engine (train.engine: deepspeed) against the torch one.

Tolerance. Parameters are compared through the relative error of the round's update,
||p_a - p_b|| / ||p_b - p_start||. Measured on this tiny model (stage 1, 6 steps of 8
samples, lr 5e-4, clipping at 0.05 acting on every step): DeepSpeed with torch's AdamW
(its CPU setting) vs the torch engine 4.2e-7 at ZeRO 0 and 3.5e-7 at ZeRO 2 (max |dp|
2.4e-8; DeepSpeed's global grad norm sums in another order); with DeepSpeed's own fused
CPU AdamW (the kind its GPU path uses) 3.3e-6 (max |dp| 4.5e-8). Real bugs sit far
above: no clipping 0.21, lr x 1.1 0.094, a stale .grad from the previous round leaking
into the first step 0.13. TOL = 1e-4 lies 30x above the fused optimiser and ~900x below
a 10% lr error; test_tolerance_can_fail checks that it catches missing clipping.

Two ranks with batch B vs one with 2B run the same engine and optimiser, so only the
order of the float sums differs: measured 6.1e-7 (max |dp| 6.5e-8) over one epoch of 7
steps. Forgetting to weight each rank's ce by its share of the answer tokens gives
1.5e-4; TOL_DP = 1e-5 sits between the two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

if __name__ == "__main__":  # run as a data-parallel worker script: tests/ (helpers.py) is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import build_client, trainable, update_error  # noqa: E402

from pilot_hpc.data.records import collate_train
from pilot_hpc.train.engines import train_steps
from pilot_hpc.train.spec import SOLO, ClientGroup, Hooks, TrainSpec

TOL = 1e-4
TOL_DP = 1e-5
LR = 5e-4
CLIP = 0.05  # below the gradient norm of every step here: clipping acts on each one
SEED = 3


def build(small_world, dropout: float | None = None, client: int = 0):
    """(PilotModel at stage 1, the client's training set, its round-start state)."""
    return build_client(small_world, client=client, **({} if dropout is None else {"lora_dropout": dropout}))


def run(pm, ds, start, *, engine: str, steps: int = 6, batch_size: int = 8, clip: float = CLIP, epochs: int = 100,
        lr: float = LR, aux=None, should_stop=None, resume=None, group=SOLO, out_of_time=None, **spec):
    """One local round from `start`: (TrainResult, the per-step terms as floats)."""
    pm.set_state(start)
    pm.set_stage(1)
    params = [p for p in pm.model.parameters() if p.requires_grad]
    seen: list[dict[str, float]] = []
    aux = aux or (lambda: {"diff": 0.1 * pm.connector.aux["diff"]})
    hooks = Hooks(aux_loss=aux, should_stop=should_stop, out_of_time=out_of_time,
                  progress=lambda s, terms: seen.append({k: float(v.detach()) for k, v in terms.items()}))
    res = train_steps(pm.model, ds, params, TrainSpec(lr=lr, batch_size=batch_size, epochs=epochs, max_steps=steps,
                                                      seed=SEED, grad_clip=clip, engine=engine, **spec),
                      pad_id=pm.tokenizer.pad_token_id, hooks=hooks, resume=resume, group=group)
    return res, seen


@pytest.fixture(scope="module")
def client(small_world):
    torch.set_num_threads(1)
    pm, ds, start = build(small_world)
    return pm, ds, start, trainable(pm)


def test_deepspeed_round_learns_and_touches_only_the_trainable_params(client):
    pm, ds, start, _ = client
    torch_ref, _ = run(pm, ds, start, engine="torch", steps=4)
    after_torch = trainable(pm)
    pm.set_state(start)
    pm.set_stage(1)
    before = {n: p.detach().clone() for n, p in pm.model.named_parameters()}
    names = set(pm.trainable_names())
    hooks = (len(pm.model._forward_pre_hooks), len(pm.model._forward_hooks))

    probe = collate_train([ds[i] for i in range(16)], pm.tokenizer.pad_token_id)
    pm.model.eval()
    with torch.no_grad():
        ce_before = float(pm.model(**probe).loss)

    res, seen = run(pm, ds, start, engine="deepspeed", steps=12, lr=1e-3, zero_stage=2)

    assert res.finite and res.steps == 12 and res.samples == 96 and res.stopped is None
    assert all(torch.isfinite(torch.tensor(list(t.values()))).all() for t in seen)
    ce = [t["ce"] for t in seen]
    first, last = sum(ce[:3]) / 3, sum(ce[-3:]) / 3
    with torch.no_grad():
        ce_after = float(pm.model(**probe).loss)
    assert last < first - 0.1, ce  # measured: 3.05 -> 2.79 (mean of the first and last 3 steps)
    assert ce_after < ce_before - 0.3, (ce_before, ce_after)  # measured: 3.27 -> 2.76 on 16 fixed samples
    assert res.losses["ce"] == pytest.approx(sum(ce) / 12, rel=1e-6)
    changed = {n for n, p in pm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names  # every trainable tensor moved; the frozen base is bitwise equal
    # The engine leaves nothing behind: no forward hooks on the model, no ZeRO gradient
    # hooks on the parameters (the torch engine on the same model reproduces itself).
    assert (len(pm.model._forward_pre_hooks), len(pm.model._forward_hooks)) == hooks
    again, _ = run(pm, ds, start, engine="torch", steps=4)
    assert torch.equal(trainable(pm), after_torch) and again.losses == torch_ref.losses


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_steps_match_torch(client, zero_stage):
    pm, ds, start, p0 = client
    ref, _ = run(pm, ds, start, engine="torch")
    p_torch = trainable(pm)
    res, _ = run(pm, ds, start, engine="deepspeed", zero_stage=zero_stage)
    p_ds = trainable(pm)
    assert res.steps == ref.steps == 6
    assert update_error(p_ds, p_torch, p0) < TOL
    for k, v in ref.losses.items():
        assert res.losses[k] == pytest.approx(v, rel=1e-5), k


def test_tolerance_can_fail(client):
    """The criterion above rejects a round without gradient clipping (measured 0.21)."""
    pm, ds, start, p0 = client
    run(pm, ds, start, engine="torch")
    p_torch = trainable(pm)
    run(pm, ds, start, engine="deepspeed", zero_stage=0, clip=0.0)
    assert update_error(trainable(pm), p_torch, p0) > 100 * TOL


def test_stop_means_restart_the_round(client):
    pm, ds, start, _ = client
    full, _ = run(pm, ds, start, engine="deepspeed", steps=5)
    p_full = trainable(pm)

    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    res, seen = run(pm, ds, start, engine="deepspeed", steps=5, should_stop=lambda step: step == 2)
    st = res.stopped
    assert st is not None and res.steps == 2 and len(seen) == 2
    assert (st.step, st.samples, st.sums, st.optimizer) == (0, 0, {}, {})
    assert torch.equal(st.torch_rng, rng)
    # The caller restores the round-start parameters and passes the progress back: a
    # fresh start, bitwise the uninterrupted round.
    again, _ = run(pm, ds, start, engine="deepspeed", steps=5, resume=st)
    assert again.stopped is None and again.losses == full.losses
    assert torch.equal(trainable(pm), p_full)


def test_out_of_time_ends_the_round_as_done_with_the_samples_seen(client):
    """train.max_local_seconds: the round ends before the step the budget is spent at, as a
    finished (shorter) round, and counts the samples of the steps taken; the first step
    always runs."""
    pm, ds, start, _ = client
    full, _ = run(pm, ds, start, engine="torch", steps=5)
    res, seen = run(pm, ds, start, engine="torch", steps=5, out_of_time=lambda step: step >= 3)
    assert res.timed_out and res.stopped is None and res.finite
    assert res.steps == 3 and len(seen) == 3 and res.samples == 3 * 8 and full.samples == 5 * 8
    res, _ = run(pm, ds, start, engine="torch", steps=5, out_of_time=lambda step: True)
    assert res.timed_out and res.steps == 1 and res.samples == 8
    assert not full.timed_out


def test_non_finite_loss_stops_the_round(client):
    pm, ds, start, _ = client
    calls = []

    def aux():  # NaN from the third forward on
        calls.append(1)
        return {"diff": pm.connector.aux["diff"] * (float("nan") if len(calls) >= 3 else 0.1)}

    res, seen = run(pm, ds, start, engine="deepspeed", steps=5, aux=aux)
    assert not res.finite and res.steps == 2 and len(seen) == 2 and res.stopped is None
    assert res.losses["ce"] == pytest.approx((seen[0]["ce"] + seen[1]["ce"]) / 2, rel=1e-6)
    assert all(torch.isfinite(p).all() for p in pm.model.parameters())  # the NaN step was not taken


def test_bad_engine_settings_fail_early(client):
    pm, ds, start, _ = client
    with pytest.raises(ValueError, match="offload_optimizer needs ZeRO"):
        run(pm, ds, start, engine="deepspeed", zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError, match="train.engine must be torch or deepspeed"):
        run(pm, ds, start, engine="jax")


# ---------------------------------------------------------------- data parallel
DP_CLIENT = 1  # caption answers differ in length: the token weighting matters
DP_BATCH = 3  # x 2 ranks: global batches of 6; the epoch's last one has 1 sample (37 = 6 x 6 + 1)


def _share_through(path: str, rank: int):
    """ClientGroup.share for the test: the leader writes its value to a file, members poll it."""

    def share(value):
        if rank == 0:
            with open(path + ".tmp", "w") as fh:
                json.dump(value, fh)
            os.replace(path + ".tmp", path)
            return value
        deadline = time.monotonic() + 120
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no value from the leader in {path}")
            time.sleep(0.05)
        with open(path) as fh:
            return json.load(fh)

    return share


def _dp_worker(rank: int, size: int, share_file: str, out: str, cache_dir: str) -> None:
    """One member of a 2-rank client group (run as a subprocess by the test below)."""
    from helpers import SMOKE, small_overrides
    from pilot_hpc.config import load_config
    from pilot_hpc.data import synthetic
    from pilot_hpc.train.warm_start import ensure_base

    torch.set_num_threads(1)
    cfg = load_config(SMOKE, small_overrides(cache_dir, os.path.join(cache_dir, "unused")))
    spec = synthetic.spec_for(cfg)
    folder = synthetic.ensure(spec, cache_dir)
    world = (cfg, folder, ensure_base(cfg, folder, spec.key()))
    pm, ds, start = build(world, dropout=0.0, client=DP_CLIENT)
    group = ClientGroup(rank=rank, size=size, share=_share_through(share_file, rank))
    res, seen = run(pm, ds, start, engine="deepspeed", steps=0, epochs=1, batch_size=DP_BATCH, group=group)
    torch.save({"params": trainable(pm), "losses": res.losses, "steps": res.steps, "samples": res.samples,
                "seen": seen}, out)


def test_two_ranks_train_like_one_with_the_whole_batch(small_world, cache_dir, tmp_path):
    procs = [subprocess.Popen([sys.executable, __file__, "dp-worker", str(r), "2", str(tmp_path / "share.json"),
                               str(tmp_path / f"rank{r}.pt"), cache_dir],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    # The single-process reference meanwhile: dropout off (masks cannot match), batch 2B.
    pm, ds, start = build(small_world, dropout=0.0, client=DP_CLIENT)
    p0 = trainable(pm)
    ref, _ = run(pm, ds, start, engine="deepspeed", steps=0, epochs=1, batch_size=2 * DP_BATCH)
    p_one = trainable(pm)
    for p in procs:
        text, _ = p.communicate(timeout=240)
        assert p.returncode == 0, text[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert len(ds) % (2 * DP_BATCH) == 1  # last step: rank 0 holds no sample and joins with weight 0
    assert torch.equal(a["params"], b["params"]) and a["losses"] == b["losses"] and a["seen"] == b["seen"]
    assert a["steps"] == ref.steps == -(-len(ds) // (2 * DP_BATCH)) and a["samples"] == ref.samples == len(ds)
    assert update_error(a["params"], p_one, p0) < TOL_DP
    for k, v in ref.losses.items():
        assert a["losses"][k] == pytest.approx(v, rel=1e-5), k


if __name__ == "__main__" and sys.argv[1:2] == ["dp-worker"]:
    _dp_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
