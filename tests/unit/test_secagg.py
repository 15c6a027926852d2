"""Secure aggregation's pure parts: key agreement and mask streams (fl/masks.py), the
fixed point in the ring Z / 2^64 (fl/secagg.py), and the config's refusals."""

import numpy as np
import pytest
import torch

from pilot_hpc.config import ConfigError, load_config
from pilot_hpc.fl import masks
from pilot_hpc.fl.secagg import (FRACTION_BITS, LIMIT, check_chain, decode_fixed, encode_fixed, in_range,
                                 quantisation_bound, ring_sum)
from pilot_hpc.fl.update import ClientUpdate, Part, Participation

# The uniformity threshold, from scipy 1.17: chi2.ppf(0.999, 255) for the 256 bins of the top
# byte. A uniform stream exceeds it with probability 1e-3; the seeds are fixed, so a pass
# stays a pass (tests/mpi/secagg_check.py adds Kolmogorov-Smirnov on what rank 0 receives).
CHI2_255_999 = 330.52


def chi_square_top_byte(words: np.ndarray) -> float:
    counts = np.bincount((words >> np.uint64(56)).astype(np.int64), minlength=256)
    expected = len(words) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def keys_of(clients, seed=7, round_=3):
    """Each client's pair keys with every other one (what each computes on its own rank)."""
    private = {c: masks.private_key(seed, c) for c in clients}
    public = {c: masks.public_bytes(private[c]) for c in clients}
    return {c: {j: masks.pair_key(private[c], public[j], round_, c, j) for j in clients if j != c} for c in clients}


def test_both_sides_of_a_pair_derive_the_same_key_and_rounds_and_pairs_differ():
    a, b, c = (masks.private_key(0, i) for i in range(3))
    pub = [masks.public_bytes(k) for k in (a, b, c)]
    assert masks.pair_key(a, pub[1], 1, 0, 1) == masks.pair_key(b, pub[0], 1, 1, 0)
    assert masks.pair_key(a, pub[1], 1, 0, 1) != masks.pair_key(a, pub[1], 2, 0, 1)  # another round
    assert masks.pair_key(a, pub[1], 1, 0, 1) != masks.pair_key(a, pub[2], 1, 0, 2)  # another pair
    # Derived from (seed, client): the same on every rank and after a resume; another seed, another key.
    assert masks.public_bytes(masks.private_key(0, 1)) == pub[1] != masks.public_bytes(masks.private_key(1, 1))
    with pytest.raises(ValueError, match="itself"):
        masks.pair_key(a, pub[0], 1, 0, 0)


def test_a_mask_stream_read_from_any_column_is_a_slice_of_the_whole_stream():
    key = keys_of([0, 1])[0][1]
    whole = masks.mask_words(key, 0, 200)
    for start, count in [(0, 8), (3, 5), (5, 19), (8, 8), (13, 150), (199, 1), (7, 0)]:
        assert np.array_equal(masks.mask_words(key, start, count), whole[start:start + count]), (start, count)
    with pytest.raises(ValueError, match="outside"):
        masks.mask_words(key, masks.MAX_COLUMNS - 2, 3)


@pytest.mark.parametrize("clients", [[0, 1], [0, 2, 5], [1, 3, 4, 6, 8]])
def test_the_masks_of_a_round_cancel_exactly_in_the_ring(clients):
    keys = keys_of(clients)
    for start, count in [(0, 64), (37, 101)]:
        totals = [masks.client_mask(keys[c], c, start, count) for c in clients]
        assert np.array_equal(ring_sum(np.stack(totals)), np.zeros(count, dtype=np.uint64))
        # and each total alone is far from zero: a real mask (a zero word has probability 2^-64)
        assert all((t != 0).all() for t in totals)


def test_fixed_point_by_hand_and_negative_values_in_twos_complement():
    row = torch.tensor([0.5, -0.25, 1.0, 0.0])
    got = encode_fixed(row, 0.5)
    unit = 2 ** FRACTION_BITS
    assert got.dtype == np.uint64
    assert got.view(np.int64).tolist() == [unit // 4, -unit // 8, unit // 2, 0]
    assert int(got[1]) == 2 ** 64 - unit // 8  # -1/8 as a ring element
    other = encode_fixed(torch.tensor([0.25, 0.75, -3.0, 2.0 ** -41]), 0.5)  # 2^-42 rounds to 0 (ties to even)
    np.testing.assert_array_equal(decode_fixed(ring_sum(np.stack([got, other]))), [0.375, 0.25, -1.0, 0.0])


def test_the_masked_sum_decodes_to_the_weighted_sum_within_the_stated_bound():
    """Five clients, values spanning 1e-6 .. 1e3, masks on: the decoded sum is the
    weighted sum to K * 2^-(F+1) plus float64 rounding; the masked words themselves look
    nothing like the plain ones."""
    gen = torch.Generator().manual_seed(3)
    clients = [0, 2, 3, 5, 6]
    x = torch.randn(5, 4096, generator=gen, dtype=torch.float64) * torch.logspace(-6, 3, 4096, dtype=torch.float64)
    x = x.float()
    w = torch.tensor([0.1, 0.3, 0.05, 0.35, 0.2], dtype=torch.float64)
    keys = keys_of(clients)
    plain = np.stack([encode_fixed(x[i], float(w[i])) for i in range(5)])
    masked = np.stack([plain[i] + masks.client_mask(keys[c], c, 100, 4096) for i, c in enumerate(clients)])
    assert np.array_equal(ring_sum(masked), ring_sum(plain))  # the masks cancel bitwise
    got = decode_fixed(ring_sum(masked))
    terms = (w[:, None] * x.double())
    exact = terms.sum(0).numpy()
    # Rounding of each term to the grid (the bound), plus float64 products and sums: a few
    # ulp of sum |w x| at 2^-52 each.
    tol = quantisation_bound(5) + 4 * 2.0 ** -52 * terms.abs().sum(0).numpy()
    assert (np.abs(got - exact) <= tol).all()
    assert (np.abs(got - exact) > 0).any()  # the bound is not vacuous: some rounding happened
    # A masked row is uniform in the ring; the plain row of a constant update is not.
    assert chi_square_top_byte(masked[1]) < CHI2_255_999
    constant = encode_fixed(torch.full((4096,), 0.5), 0.3)
    assert chi_square_top_byte(constant) > 100 * CHI2_255_999


def test_values_beyond_the_rings_range_are_flagged():
    def update(v):
        return ClientUpdate(client=0, parts={Part.SHARED_BY_TASK: torch.zeros(0), Part.PERSONAL: torch.tensor(v)},
                            num_samples=1, status=Participation.PARTICIPATED)

    assert in_range(update([LIMIT, -LIMIT, 0.0]))
    assert not in_range(update([0.0, -LIMIT * 1.001]))
    # At the limit with weight 1 the term still fits an int64 (2^62 < 2^63).
    assert encode_fixed(torch.tensor([LIMIT, -LIMIT], dtype=torch.float64), 1.0).view(np.int64).tolist() == \
        [2 ** 62, -2 ** 62]


def test_a_transform_that_decodes_is_refused_with_secure_aggregation():
    from pilot_hpc.fl.transforms import Chain, Transform, WireDtype

    class Clip(Transform):  # encode only: fine
        name = "clip"

    class Codec(Transform):
        name = "codec"

        def decode(self, part, block, cols):
            return block

    cfg = load_config(None, ["fl.strategy=fedavg", "privacy.secure_aggregation=true"])
    check_chain(Chain([Clip(cfg), WireDtype(cfg)]))
    with pytest.raises(ConfigError, match=r"\['codec'\].*only ever sees the masked sum"):
        check_chain(Chain([Clip(cfg), Codec(cfg), WireDtype(cfg)]))


@pytest.mark.parametrize("strategy,why", [("pilot", "distances between their individual updates"),
                                          ("local", "exchanges nothing"), ("centralized", "pools every client")])
def test_strategies_that_need_the_individual_updates_refuse_secure_aggregation(strategy, why):
    with pytest.raises(ConfigError, match=f"privacy.secure_aggregation=true cannot go with "
                                          f"fl.strategy={strategy}: .*{why}"):
        load_config(None, [f"fl.strategy={strategy}", "privacy.secure_aggregation=true"])


def test_the_secure_sum_list_matches_the_aggregators():
    """Allowed: every personal row of the plan is one weighted mean and no Gram matrix is
    needed (the plan is one sum); refused: the others, and the strategies without a server."""
    from pilot_hpc.fl.strategies import REGISTRY, get_strategy
    from pilot_hpc.sections import SECURE_SUM_REFUSED, SECURE_SUM_STRATEGIES

    assert set(SECURE_SUM_STRATEGIES) | set(SECURE_SUM_REFUSED) == set(REGISTRY)
    assert not set(SECURE_SUM_STRATEGIES) & set(SECURE_SUM_REFUSED)
    for name in REGISTRY:
        cfg = load_config(None, [f"fl.strategy={name}"])
        agg = get_strategy(name, cfg).aggregator
        one_sum = agg is not None and agg.global_personal and not agg.needs_gram and agg.shared_rows() == 1
        assert one_sum == (name in SECURE_SUM_STRATEGIES), name
        if name in SECURE_SUM_STRATEGIES:
            load_config(None, [f"fl.strategy={name}", "privacy.secure_aggregation=true"])  # accepted


def test_secure_aggregation_on_changes_the_hashes():
    """(Off, the default, hashes as before: test_config pins the smoke config's hashes.)"""
    from helpers import SMOKE

    on = load_config(SMOKE, ["fl.strategy=fedavg", "privacy.secure_aggregation=true"])
    off = load_config(SMOKE, ["fl.strategy=fedavg"])
    assert on.hash() != off.hash() and on.result_hash() != off.result_hash()
