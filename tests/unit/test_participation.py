"""Per-round client sampling (pilot_hpc.fl.participation): a pure function of (seed, round)."""

import pytest
import torch

from pilot_hpc.config import ConfigError, load_config
from pilot_hpc.fl import participation
from pilot_hpc.fl.participation import participants_count, select_clients, task_quotas

from helpers import SMOKE

TASKS = [0] * 3 + [1] * 3 + [2] * 3


@pytest.mark.parametrize("value, want", [(0, 9), (0.5, 5), (0.1, 1), (0.3333, 3), (1, 1), (4, 4), (9, 9)])
def test_the_count_is_every_client_a_fraction_rounded_up_or_a_count(value, want):
    assert participants_count(value, 9) == want
    assert participants_count(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in floats


@pytest.mark.parametrize("rule", ["uniform", "stratified"])
def test_the_selection_is_a_pure_function_of_seed_and_round(rule):
    a = [select_clients(7, r, TASKS, 4, rule) for r in range(1, 20)]
    b = [select_clients(7, r, TASKS, 4, rule) for r in range(1, 20)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(int(x.sum()) == 4 for x in a)
    assert len({tuple(x.tolist()) for x in a}) > 3  # it changes from round to round
    assert not torch.equal(select_clients(8, 1, TASKS, 4, rule), a[0]) or \
        not torch.equal(select_clients(8, 2, TASKS, 4, rule), a[1])  # and with the seed


def test_it_does_not_touch_the_global_random_streams():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    select_clients(0, 1, TASKS, 3, "uniform")
    assert torch.equal(torch.rand(1), before)


def test_stratified_seats_every_task_when_the_count_allows():
    for r in range(1, 50):
        mask = select_clients(3, r, TASKS, 3, "stratified")
        assert sorted(TASKS[c] for c in mask.nonzero().flatten().tolist()) == [0, 1, 2]
    # Uniform leaves some task out in some round (so the test above can fail).
    assert any(len({TASKS[c] for c in select_clients(3, r, TASKS, 3, "uniform").nonzero().flatten().tolist()}) < 3
               for r in range(1, 50))
    # Fewer seats than tasks: distinct tasks, one client each.
    for r in range(1, 20):
        got = [TASKS[c] for c in select_clients(3, r, TASKS, 2, "stratified").nonzero().flatten().tolist()]
        assert len(got) == 2 and len(set(got)) == 2


def test_stratified_splits_the_count_in_proportion_to_the_tasks_sizes():
    assert task_quotas([3, 3, 3], 5) == [2, 2, 1]
    assert task_quotas([6, 2, 1], 6) == [4, 1, 1]
    assert task_quotas([1, 1, 4], 6) == [1, 1, 4]  # a full task takes no more seats


def test_the_config_draws_the_same_set_on_every_rank_and_nothing_at_the_default():
    cfg = load_config(SMOKE, ["fl.clients_per_round=0.34", "fl.sampling=stratified"])
    # Federation.selected and Aggregator.select both call this with (cfg, round): no rank,
    # world size or resume state enters.
    assert torch.equal(participation.selected(cfg, 2), participation.selected(cfg, 2))
    assert int(participation.selected(cfg, 2).sum()) == 4
    assert bool(participation.selected(load_config(SMOKE), 2).all())


@pytest.mark.parametrize("override, shown", [("fl.clients_per_round=2.5", "whole number"),
                                             ("fl.clients_per_round=10", "at most fl.num_clients"),
                                             ("fl.clients_per_round=-0.5", "fl.clients_per_round must be >= 0")])
def test_a_bad_count_names_the_key(override, shown):
    with pytest.raises(ConfigError, match=shown):
        load_config(SMOKE, [override])
    with pytest.raises(ConfigError, match="centralized"):
        load_config(SMOKE, ["fl.strategy=centralized", "fl.clients_per_round=0.5"])


def test_ata_among_participants_caps_m_and_says_so(caplog):
    from pilot_hpc.fl.strategies import get_strategy

    cfg = load_config(SMOKE, ["pilot.top_m=6"])
    server = get_strategy("pilot", cfg).aggregator
    u = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    n = torch.full((9,), 10)
    good = torch.zeros(9, dtype=torch.bool)
    good[[0, 3, 4, 8]] = True
    with caplog.at_level("INFO", logger="pilot_hpc.fl"):
        plan = server.plan(n, good, u @ u.T)
    assert "ATA: 4 clients took part, so each mixes its 3 nearest (pilot.top_m=6 capped)" in caplog.text
    # Each participant mixes itself and the 3 others; those who sat out get NaN rows.
    assert all(int((plan.personal[k] > 0).sum()) == 4 for k in (0, 3, 4, 8))
    assert bool(plan.personal[1].isnan().all())
    caplog.clear()
    with caplog.at_level("INFO", logger="pilot_hpc.fl"):
        server.plan(n, torch.ones(9, dtype=torch.bool), u @ u.T)
    assert "capped" not in caplog.text


def test_which_errors_drop_a_client():
    from pilot_hpc.errors import DataError
    from pilot_hpc.fl.client import TransitionError

    exclude = load_config(SMOKE, ["fl.on_client_error=exclude"])
    assert participation.should_drop(exclude, RuntimeError("boom"))
    assert participation.should_drop(exclude, torch.OutOfMemoryError("CUDA out of memory"))
    assert not participation.should_drop(exclude, DataError("bad file"))  # bad input: exit 2, every client alike
    assert not participation.should_drop(exclude, TransitionError("bookkeeping bug"))
    assert not participation.should_drop(exclude, ValueError("a bug"))
    assert not participation.should_drop(load_config(SMOKE), RuntimeError("boom"))  # abort: today's behaviour
    with pytest.raises(ConfigError, match="run.ranks_per_client"):
        load_config(SMOKE, ["fl.on_client_error=exclude", "run.ranks_per_client=2", "train.engine=deepspeed"])


def test_which_clients_are_evaluated_when():
    base = ["fl.rounds=7", "fl.clients_per_round=3"]
    every = load_config(SMOKE, base + ["fl.eval_every=3"])
    assert [bool(participation.evaluated(every, r, None).all()) for r in range(8)] == \
        [True, False, False, True, False, False, True, True]  # round 0, every 3rd and the last
    assert not participation.evaluated(every, 4, None).any()
    part = load_config(SMOKE, base + ["fl.eval_clients=participants"])
    chosen = participation.selected(part, 2)
    assert torch.equal(participation.evaluated(part, 2, chosen), chosen) and int(chosen.sum()) == 3
    assert bool(participation.evaluated(part, 7, participation.selected(part, 7)).all())  # the last round: all
    assert bool(participation.evaluated(part, 0, None).all())
    sample = load_config(SMOKE, base + ["fl.eval_clients=sample", "fl.eval_sample=3"])
    got = [participation.evaluated(sample, r, participation.selected(sample, r)) for r in range(8)]
    assert all(torch.equal(g, got[0]) for g in got) and int(got[0].sum()) == 3  # the same fixed sample
    assert sorted(TASKS[c] for c in got[0].nonzero().flatten().tolist()) == [0, 1, 2]  # one per task
    with pytest.raises(ConfigError, match="fl.eval_sample"):
        load_config(SMOKE, ["fl.eval_clients=sample"])
    with pytest.raises(ConfigError, match="fl.eval_sample"):
        load_config(SMOKE, ["fl.eval_sample=2"])


def test_the_answers_key_changes_with_each_thing_answers_depend_on():
    from pilot_hpc.data.records import Sample

    gen = torch.Generator().manual_seed(0)
    state = {"connector.w": torch.randn(4, 3, generator=gen), "lora.b": torch.zeros(2, 2, dtype=torch.bfloat16)}
    items = [Sample("q1", "a.png", [("what colour?", "red")], subset="seen"),
             Sample("q2", "b.png", [("where?", "left")], subset="unseen")]
    key = participation.answers_key(state, 0, 2, items)
    same = {k: v.clone() for k, v in reversed(list(state.items()))}  # other tensors, other order
    assert participation.answers_key(same, 0, 2, [Sample(**vars(s)) for s in items]) == key
    nudged = dict(state, **{"connector.w": state["connector.w"].clone()})
    nudged["connector.w"][1, 2] = torch.nextafter(nudged["connector.w"][1, 2], torch.tensor(9.0))  # one ulp
    signed = dict(state, **{"lora.b": -state["lora.b"]})  # -0.0: other bytes, maybe other results
    reshaped = dict(state, **{"connector.w": state["connector.w"].reshape(3, 4)})
    others = [participation.answers_key(nudged, 0, 2, items), participation.answers_key(signed, 0, 2, items),
              participation.answers_key(reshaped, 0, 2, items), participation.answers_key(state, 1, 2, items),
              participation.answers_key(state, 0, 1, items), participation.answers_key(state, 0, 2, items[:1]),
              participation.answers_key(state, 0, 2, [items[0], Sample(**dict(vars(items[1]), subset="seen"))])]
    assert len({key, *others}) == 1 + len(others)
