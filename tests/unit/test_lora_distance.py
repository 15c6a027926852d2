"""The product distance of LoRA (fl/lora_distance.py) against explicitly formed products."""

from __future__ import annotations

import pytest
import torch

from pilot_hpc.fl import aggregate
from pilot_hpc.fl import lora_distance as ld


def _clients(ranks, shapes, seed=0, dtype=torch.float64):
    """Per module (A_k [r_k, in], B_k [out, r_k]) of clients with the given ranks."""
    g = torch.Generator().manual_seed(seed)
    return [([torch.randn(r, n_in, generator=g, dtype=dtype) for r in ranks],
             [torch.randn(n_out, r, generator=g, dtype=dtype) for r in ranks]) for n_in, n_out in shapes]


def _explicit(modules, scales):
    """||sum-over-modules s B A||^2 distances from the formed products (the reference)."""
    k = len(modules[0][0])
    d2 = torch.zeros(k, k, dtype=torch.float64)
    for m, (a_list, b_list) in enumerate(modules):
        prods = [scales[m][i] * (b_list[i] @ a_list[i]) for i in range(k)]
        for i in range(k):
            for j in range(k):
                d2[i, j] += ((prods[i] - prods[j]) ** 2).sum()
    return d2


# float64 throughout: the Gram route and the formed products differ by rounding of sums
# of ~in*out*r terms of size O(1), so a relative 1e-10 leaves many orders of margin over
# float64's 1e-16 while catching any wrong term (errors would be O(1)).
REL = 1e-10


@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 5, 3, 1]])
def test_product_distance_matches_formed_products(ranks):
    modules = _clients(ranks, [(7, 5), (3, 6)])
    scales = [[2.0 / r for r in ranks], [16.0 / r for r in ranks]]  # peft: alpha / r, per client rank
    got = ld.product_sq_distances(modules, scales)
    want = _explicit(modules, scales)
    assert want.max() > 1.0  # the test compares real distances
    assert torch.allclose(got, want, rtol=REL, atol=REL * float(want.max()))


def test_scaling_matters():
    """Same factors, one client's scaling doubled: its product doubles, so its distances change."""
    modules = _clients([3, 3], [(4, 4)])
    same = ld.product_sq_distances(modules, [[1.0, 1.0]])
    doubled = ld.product_sq_distances(modules, [[1.0, 2.0]])
    want = _explicit(modules, [[1.0, 2.0]])
    assert not torch.allclose(same, doubled)
    assert torch.allclose(doubled, want, rtol=REL)


def test_equal_products_of_different_factors_are_at_distance_zero():
    """B A = (B M)(M^-1 A): the product distance sees the layer change, not the factors."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    m = torch.randn(3, 3, generator=g, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    modules = [([a, torch.linalg.solve(m, a)], [b, b @ m])]
    d2 = ld.product_sq_distances(modules, [[1.0, 1.0]])
    # The Gram route cancels terms of size ||BA||^2: float64 leaves ~1e-16 of that (times
    # the conditioning of M), against a distance of the order of ||BA||^2 for any error.
    assert float(d2[0, 1]) < 1e-12 * float((b @ a).pow(2).sum())
    flat = aggregate.pairwise_distances(torch.stack([torch.cat([a.flatten(), b.flatten()]),
                                                     torch.cat([modules[0][0][1].flatten(), (b @ m).flatten()])]))
    assert float(flat[0, 1]) > 0.1  # the flat parameters differ


def test_zero_padding_changes_nothing():
    modules = _clients([2, 4], [(5, 3)])
    a_list, b_list = modules[0]
    padded = [([torch.cat([a_list[0], torch.zeros(2, 5, dtype=torch.float64)]), a_list[1]],
               [torch.cat([b_list[0], torch.zeros(3, 2, dtype=torch.float64)], dim=1), b_list[1]])]
    assert torch.equal(ld.product_gram(modules, [[1.0, 1.0]]), ld.product_gram(padded, [[1.0, 1.0]]))


def _row_and_named(modules_per_client, extra_scale=1.0):
    """One client's personal row in peft's order: A then B of each module."""
    named = []
    for m, (a, b) in enumerate(modules_per_client):
        named += [(f"layers.{m}.q_proj.lora_A.default.weight", a), (f"layers.{m}.q_proj.lora_B.default.weight", b)]
    return named


def test_layout_pairs_factors_and_offsets():
    a0, b0 = torch.zeros(2, 3), torch.zeros(4, 2)
    a1, b1 = torch.zeros(2, 5), torch.zeros(1, 2)
    named = _row_and_named([(a0, b0), (a1, b1)])
    spans = ld.layout(named, 0.5)
    assert [(s.a_off, s.a_shape, s.b_off, s.b_shape, s.scale) for s in spans] == [
        (0, (2, 3), 6, (4, 2), 0.5), (14, (2, 5), 24, (1, 2), 0.5)]
    assert spans[-1].end == 26
    with pytest.raises(ValueError, match="no .*lora_B"):
        ld.layout(named[:1], 1.0)
    with pytest.raises(ValueError, match="not a LoRA factor"):
        ld.layout([("connector.weight", a0)], 1.0)


@pytest.mark.parametrize("chunk", [1, 5, 13, 26, 1000])
def test_streamed_product_gram_equals_the_pure_function(chunk):
    """Rows fed in chunks of odd sizes (factors straddling chunks, several per chunk)."""
    k, shapes, r = 4, [(3, 4), (5, 1), (2, 6)], 3
    g = torch.Generator().manual_seed(2)
    clients = [[(torch.randn(r, n_in, generator=g, dtype=torch.float64),
                 torch.randn(n_out, r, generator=g, dtype=torch.float64)) for n_in, n_out in shapes]
               for _ in range(k)]
    spans = ld.layout(_row_and_named(clients[0]), 0.75)
    rows = torch.stack([torch.cat([t.flatten() for _, t in _row_and_named(c)]) for c in clients])
    acc = ld.ProductGram(spans, k)
    for a in range(0, rows.shape[1], chunk):
        acc.feed(rows[:, a:a + chunk], a)
    modules = [([c[m][0] for c in clients], [c[m][1] for c in clients]) for m in range(len(shapes))]
    want = ld.product_gram(modules, [[0.75] * k] * len(shapes))
    assert torch.allclose(acc.result(), want, rtol=REL, atol=REL * float(want.abs().max()))
    assert not acc.filling and not acc.done  # nothing held once the row is through


def test_streamed_product_gram_refuses_gaps_and_short_rows():
    spans = ld.layout(_row_and_named([(torch.zeros(2, 3), torch.zeros(4, 2))]), 1.0)
    acc = ld.ProductGram(spans, 2)
    acc.feed(torch.zeros(2, 5), 0)
    with pytest.raises(ValueError, match="expected 5"):
        acc.feed(torch.zeros(2, 5), 6)
    with pytest.raises(RuntimeError, match="incomplete"):
        acc.result()


def test_stack_aggregate_is_the_weighted_sum_of_products_exactly():
    ranks, weights = [2, 5, 3], [0.2, 0.5, 0.3]
    scales = [16.0 / r for r in ranks]
    (a_list, b_list), = _clients(ranks, [(6, 4)], seed=3)
    a, b = ld.stack_factors(a_list, b_list, weights, scales)
    assert a.shape == (10, 6) and b.shape == (4, 10)
    want = sum(w * s * (bk @ ak) for w, s, ak, bk in zip(weights, scales, a_list, b_list))
    # Exact up to float64 rounding of the r-term dot products (the stacked product has no cross terms).
    assert torch.allclose(b @ a, want, rtol=1e-13, atol=1e-13 * float(want.abs().max()))
    # Averaging the padded factors instead (zero_pad) is not the average product:
    pa = ld._pad_rank(a_list, 0, 5)
    pb = ld._pad_rank(b_list, 1, 5)
    mixed = sum(w * s * pb[i] for i, (w, s) in enumerate(zip(weights, scales))) @ sum(w * pa[i] for i, w in
                                                                                       enumerate(weights))
    assert not torch.allclose(mixed, want, rtol=1e-3)


def test_beyond_rank_mask():
    spans = ld.layout(_row_and_named([(torch.zeros(3, 2), torch.zeros(2, 3))]), 1.0)
    mask = ld.beyond_rank_mask(spans, 12, 1)
    # A [3, 2]: rows 1, 2 (values 2..5); B [2, 3] at 6: columns 1, 2 of each row.
    assert mask.nonzero().flatten().tolist() == [2, 3, 4, 5, 7, 8, 10, 11]
    assert not ld.beyond_rank_mask(spans, 12, 3).any()


def _pilot_server(k, distance, spans=None):
    from pilot_hpc.config import load_config
    from pilot_hpc.fl.strategies import get_strategy

    tasks = (["vqa", "caption", "grounding"] * k)[:k]
    cfg = load_config(None, ["fl.strategy=pilot", "pilot.top_m=1", f"pilot.distance={distance}",
                             f"fl.num_clients={k}", f"fl.client_tasks={tasks}"])
    server = get_strategy("pilot", cfg).aggregator
    server.spans = spans
    return server


def test_pilot_plan_on_products_follows_the_formed_products():
    """Client 1's factors are client 0's in another gauge (B M, M^-1 A): on products they are
    each other's nearest, on flat parameters they are not; the one-shot plan with
    pilot.distance=product picks the neighbours the formed products give."""
    g = torch.Generator().manual_seed(4)
    a0, b0 = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    m = torch.tensor([[4.0, 1.0], [0.0, 0.25]], dtype=torch.float64)
    factors = [(a0, b0), (torch.linalg.solve(m, a0), b0 @ m),
               (a0 + 0.3, b0 + 0.3), (a0 - 0.1 * torch.randn(2, 5, generator=g, dtype=torch.float64), b0 * 1.5)]
    named = _row_and_named([factors[0]])
    rows = torch.stack([torch.cat([a.flatten(), b.flatten()]) for a, b in factors])
    spans = ld.layout(named, 2.0)
    n = torch.tensor([5, 6, 7, 8])
    product = _pilot_server(4, "product", spans).aggregate(torch.zeros(4, 3), rows, n)
    params = _pilot_server(4, "params").aggregate(torch.zeros(4, 3), rows, n)
    want_d2 = _explicit([([a for a, _ in factors], [b for _, b in factors])], [[2.0] * 4])
    gram = ld.product_gram([([a for a, _ in factors], [b for _, b in factors])], [[2.0] * 4])
    want = aggregate._mix(aggregate.ata_coefficients(want_d2.sqrt(), n, 1), rows)
    # Rows 0 and 1 only: clients 2 and 3 are exactly as far from 0 as from 1 (equal
    # products), a tie that rounding breaks either way. float64 mixes of the same rows
    # with coefficients equal to ~1e-15: 1e-12 is far above rounding, far below any
    # other choice of neighbour (O(1) differences).
    torch.testing.assert_close(product.personal[:2], want[:2], rtol=1e-12, atol=1e-12)
    assert torch.allclose(aggregate.distances_from_gram(gram) ** 2, want_d2, rtol=1e-10, atol=1e-10)
    # Client 0's nearest: client 1 on products, another on the flat parameters.
    assert int(want_d2[0, 1:].argmin()) + 1 == 1
    assert int(aggregate.pairwise_distances(rows)[0, 1:].argmin()) + 1 != 1
    assert not torch.allclose(product.personal, params.personal)


def test_product_distance_needs_topm_and_is_unhashed_at_default():
    from pilot_hpc.config import Config, ConfigError, load_config

    with pytest.raises(ConfigError, match="pilot.distance=product .* pilot.selection=topm"):
        load_config(None, ["pilot.distance=product", "pilot.selection=all"])
    assert load_config(None, ["pilot.distance=params"]).hash() == Config().hash()
    assert load_config(None, ["pilot.distance=product"]).hash() != Config().hash()


def test_model_layout_covers_pilots_personal_row(small_world):
    """On the tiny model: the spans tile Pilot's personal row (every LoRA value in one
    module's A or B, in row order) and carry peft's scaling lora_alpha / r."""
    from helpers import build_client
    from pilot_hpc.config import load_config
    from pilot_hpc.fl.strategies.pilot import PilotClient

    pm, _, _ = build_client(small_world)
    spans = ld.model_layout(pm)
    personal = PilotClient(load_config(None, [])).personal_params(pm)
    width = sum(p.numel() for p in personal)
    covered = torch.zeros(width, dtype=torch.int64)
    for s in spans:
        covered[s.a_off:s.a_off + s.a_shape[0] * s.a_shape[1]] += 1
        covered[s.b_off:s.b_off + s.b_shape[0] * s.b_shape[1]] += 1
    assert spans and bool((covered == 1).all())
    cfg = small_world[0]
    assert {s.scale for s in spans} == {cfg.model.lora_alpha / cfg.model.lora_r}
    assert {s.rank for s in spans} == {cfg.model.lora_r}


def test_neighbours_tool_tells_the_two_distances_apart():
    """tools/neighbours on three clients' states: client 1 is client 0 in another gauge
    (nearest on products), client 2 is near client 0's factors but not its product."""
    from pilot_hpc.tools.neighbours import compare

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    m = torch.tensor([[3.0, 0.0], [0.0, 1 / 3]], dtype=torch.float64)

    def state(a_, b_):
        return {"lora.q.lora_A.default.weight": a_, "lora.q.lora_B.default.weight": b_}

    states = [state(a, b), state(torch.linalg.solve(m, a), b @ m), state(a + 0.5, b - 0.5)]
    got = compare(states, 1, 2.0)
    assert got["product"][0] == [1] and got["params"][0] == [2]
    assert 0 in got["differ"]
