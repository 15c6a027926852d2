"""Baseline strategies: aggregation formulas by hand, what each sends, and runs that do
not depend on the world size."""

import pytest
import torch

from helpers import task_world
from pilot_hpc.config import ConfigError, load_config
from pilot_hpc.fl import aggregate
from pilot_hpc.fl.strategies import REGISTRY, get_strategy
from pilot_hpc.fl.strategies.fedadam import adam_server_step
from pilot_hpc.fl.strategies.fedprox import proximal_term
from pilot_hpc.fl.update import Part


def cfg(*extra):
    return load_config(None, list(extra))


def parts(shared, personal):
    return {Part.SHARED_BY_TASK: shared, Part.PERSONAL: personal}


def test_registry_names():
    assert {"pilot", "fedavg", "fedprox", "fedadam", "shepherd", "feddpa", "local", "centralized"} <= set(REGISTRY)
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        get_strategy("nope", cfg())


def test_fedavg_is_the_sample_weighted_mean_sent_to_everyone():
    s = get_strategy("fedavg", task_world([0, 1, 2])).aggregator
    visual = torch.tensor([[0.0, 2.0], [4.0, 6.0], [float("nan"), 0.0]])
    text = torch.tensor([[1.0], [3.0], [5.0]])
    res = s.aggregate(visual, text, torch.tensor([1, 3, 4]))
    # client 2 is excluded (NaN): weights 1/4, 3/4
    torch.testing.assert_close(res.shared, torch.tensor([[3.0, 5.0]]))
    torch.testing.assert_close(res.personal, torch.tensor([[2.5], [2.5], [2.5]]))
    assert res.excluded == [2]


def test_fedadam_first_two_server_steps_by_hand():
    fa = cfg("fedadam.server_lr=0.1", "fedadam.beta1=0.5", "fedadam.beta2=0.5").fedadam
    w, m, v = torch.tensor([1.0]), torch.zeros(1), torch.zeros(1)
    # step 1: delta = 3 - 1 = 2; m = 1; v = 2; w = 1 + 0.1 * 1 / sqrt(2) (tau = 0 keeps the
    # numbers round; the config refuses it, the pure step takes it)
    w, m, v = adam_server_step(w, m, v, torch.tensor([3.0]), lr=fa.server_lr, beta1=fa.beta1,
                               beta2=fa.beta2, tau=0.0)
    w1 = 1 + 0.1 / 2 ** 0.5
    torch.testing.assert_close(w, torch.tensor([w1]))
    torch.testing.assert_close((m, v), (torch.tensor([1.0]), torch.tensor([2.0])))
    # step 2: avg 0 -> delta = -w1; m = 0.5 - w1 / 2; v = 1 + w1^2 / 2
    w, m, v = adam_server_step(w, m, v, torch.tensor([0.0]), lr=0.1, beta1=0.5, beta2=0.5, tau=0.0)
    m2, v2 = 0.5 - w1 / 2, 1 + w1 ** 2 / 2
    torch.testing.assert_close(w, torch.tensor([w1 + 0.1 * m2 / v2 ** 0.5]))


def test_fedadam_state_persists_across_rounds():
    world = task_world([0, 1], "fedadam.server_lr=1.0")
    s = get_strategy("fedadam", world).aggregator
    s.init_server(parts(torch.zeros(2), torch.zeros(1)))
    one = s.aggregate(torch.ones(2, 2), torch.ones(2, 1), torch.tensor([1, 1]))
    state = s.server_state()
    assert set(state) == {"w", "m", "v", "split"}
    again = get_strategy("fedadam", world).aggregator
    again.load_server_state(state)
    a = s.aggregate(torch.ones(2, 2), torch.ones(2, 1), torch.tensor([1, 1]))
    b = again.aggregate(torch.ones(2, 2), torch.ones(2, 1), torch.tensor([1, 1]))
    torch.testing.assert_close(a.shared, b.shared)
    assert not torch.equal(one.shared, a.shared)  # the moments moved the second step


def test_fedadam_uniform_weighting_is_the_plain_mean_of_the_good_clients():
    """fedadam.weighting=uniform: Reddi et al.'s Algorithm 2, the participants' unweighted mean;
    samples (the default): weighted by n_k as FedAvg. Client 2's update is NaN (excluded)."""
    visual = torch.tensor([[0.0, 2.0], [4.0, 6.0], [float("nan"), 0.0]])
    text = torch.tensor([[1.0], [3.0], [5.0]])
    n, tasks, good = torch.tensor([1, 3, 4]), torch.tensor([0, 1, 2]), torch.tensor([True, True, False])
    means = {"uniform": ([2.0, 4.0], [2.0]), "samples": ([3.0, 5.0], [2.5])}  # (0+4)/2 ... ; 1/4, 3/4
    for weighting, (mean_v, mean_t) in means.items():
        s = get_strategy("fedadam", task_world(tasks.tolist(), f"fedadam.weighting={weighting}", "fedadam.server_lr=0.1",
                                               "fedadam.beta1=0.5", "fedadam.beta2=0.5")).aggregator
        want = [0.5, 0.5, 0.0] if weighting == "uniform" else [0.25, 0.75, 0.0]
        plan = s.plan(n, good, None)
        assert plan.shared.tolist() == [want] and plan.personal.tolist() == [want] * 3 and plan.excluded == [2]
        s.init_server(parts(torch.zeros(2), torch.zeros(1)))
        res = s.aggregate(visual, text, n)
        # w = 0, so delta is the mean: m = (1 - b1) delta, v = (1 - b2) delta^2
        mean = torch.tensor(mean_v + mean_t)
        state = s.server_state()
        torch.testing.assert_close(state["m"], 0.5 * mean)
        torch.testing.assert_close(state["v"], 0.5 * mean * mean)
        w = 0.1 * state["m"] / (state["v"].sqrt() + 1e-3)
        torch.testing.assert_close(res.shared[0], w[:2])
        torch.testing.assert_close(res.personal, w[2:].expand(3, 1))
        assert res.excluded == [2]


def test_fedprox_term_and_its_gradient():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    anchor = [torch.tensor([0.0, 4.0])]
    term = proximal_term([w], anchor, mu=0.5)
    assert term.item() == pytest.approx(0.25 * (1 + 4))
    term.backward()
    torch.testing.assert_close(w.grad, 0.5 * (w.detach() - anchor[0]))


def test_what_each_strategy_sends(small_world):
    from pilot_hpc.model.llava import build_pilot_model

    c, _, base = small_world
    pm = build_pilot_model(base, c.model, 3, 0, seed=0, device=torch.device("cpu"))
    projector = list(pm.connector.task_adapter.parameters())
    lora = [p for _, p in pm.lora_named_parameters()]
    for name, visual in (("pilot", projector), ("fedavg", projector), ("fedprox", projector),
                         ("fedadam", projector), ("shepherd", [])):
        s = get_strategy(name, c).policy
        assert [id(p) for p in s.shared_params(pm)] == [id(p) for p in visual], name
        assert [id(p) for p in s.personal_params(pm)] == [id(p) for p in lora], name
    assert not get_strategy("local", c).communicates and not get_strategy("centralized", c).communicates


def test_pilot_selection_ablations_by_hand():
    text = torch.tensor([[0.0], [2.0], [10.0], [float("nan")]])
    visual = torch.zeros(4, 1)
    n = torch.tensor([1, 3, 2, 2])
    tasks = torch.tensor([0, 0, 1, 1])
    same = get_strategy("pilot", task_world(tasks.tolist(), "pilot.selection=same_task")).aggregator.aggregate(
        visual, text, n)
    # task 0: (1*0 + 3*2)/4 = 1.5; task 1: only client 2 is good -> 10; client 3 excluded
    torch.testing.assert_close(same.personal[:3], torch.tensor([[1.5], [1.5], [10.0]]))
    assert torch.isnan(same.personal[3]).all() and same.excluded == [3]
    everyone = get_strategy("pilot", task_world(tasks.tolist(), "pilot.selection=all")).aggregator.aggregate(
        visual, text, n)
    torch.testing.assert_close(everyone.personal[:3], torch.full((3, 1), (0 + 6 + 20) / 6))


def test_ctmoa_without_cross_task_adapters(small_world):
    from pilot_hpc.model.connector import adapter_weights
    from pilot_hpc.model.ctmoa import ctmoa_reference
    from pilot_hpc.model.llava import build_pilot_model

    c, _, base = small_world
    pm = build_pilot_model(base, c.model, 3, 1, seed=0, device=torch.device("cpu"),
                           pilot=load_config(None, ["pilot.cross_task=false"]).pilot)
    pm.set_stage(2)
    names = pm.trainable_names()
    assert any("router" in n for n in names) and not any(".cross." in n for n in names)
    mlps, expert_of = pm.connector.ctmoa_adapters()
    assert expert_of == [0, 1, 2] and len(mlps) == 3
    h = torch.randn(2, 9, c.model.vision_hidden)
    with torch.no_grad():
        out = pm.connector(h)
        ref = ctmoa_reference(h, pm.connector.router.weight,
                              [adapter_weights(pm.connector.task_adapter)] +
                              [adapter_weights(f) for f in pm.connector.foreign], [0, 1, 2]).out
    torch.testing.assert_close(out, ref)




def test_pilot_records_ata_neighbours_and_distances_by_hand():
    # 1-d LoRA at 0, 1, 5, 9 and an excluded client: distances |a - b| among the good ones.
    text = torch.tensor([[0.0], [1.0], [5.0], [9.0], [float("nan")]])
    n = torch.tensor([1, 1, 1, 1, 1])
    server = get_strategy("pilot", task_world([0, 0, 1, 1, 1], "pilot.top_m=2")).aggregator
    assert server.round_record() == {}  # nothing chosen before the first plan
    got = server.aggregate(torch.zeros(5, 1), text, n)
    ata = server.round_record()["ata"]
    # client 1 is 1 from 0 and 4 from 5; client 2 is 4 from 1 and 4 from 9: the tie goes to the lower id
    assert ata["neighbours"] == [[1, 2], [0, 2], [1, 3], [2, 1], None]
    assert ata["distance"] == "params"
    assert ata["distances"][0][:4] == [0.0, 1.0, 5.0, 9.0] and ata["distances"][4] == [None] * 5
    assert all(row[4] is None for row in ata["distances"])
    # the neighbours are the clients each mixes with (off-diagonal nonzeros of its row)
    coef = server.plan(n, torch.tensor([True, True, True, True, False]),
                       aggregate.gram_matrix(aggregate.zero_bad_rows(text, aggregate.finite_rows(text))))
    for k, near in enumerate(ata["neighbours"][:4]):
        assert sorted(near) == [i for i in range(5) if i != k and coef.personal[k, i] > 0]
    assert got.excluded == [4]
    same = get_strategy("pilot", task_world([0, 0, 1, 1, 1], "pilot.selection=same_task")).aggregator
    same.aggregate(torch.zeros(5, 1), text, n)
    assert same.round_record() == {}  # no distances without ATA
