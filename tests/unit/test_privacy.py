"""Client-level differential privacy (pilot_hpc.fl.privacy, pilot_hpc.fl.accounting): the
clip, the noise's seeding and size, the server-side mixing, the accountant's numbers and
the config's refusals."""

import math

import pytest
import torch

from helpers import SMOKE
from pilot_hpc.config import ConfigError, load_config
from pilot_hpc.fl import aggregate, privacy
from pilot_hpc.fl.strategies import get_strategy
from pilot_hpc.fl.transforms import chain_for
from pilot_hpc.fl.update import PARTS, ClientUpdate, Part, Participation

SHARED, PERSONAL = Part.SHARED_BY_TASK, Part.PERSONAL


def cfg_with(*extra):
    return load_config(SMOKE, ["fl.num_clients=3", "fl.client_tasks=[vqa, caption, grounding]", "pilot.top_m=1",
                               *extra])


def an_update(client, round_, start, params, status=Participation.PARTICIPATED):
    return ClientUpdate(client=client, parts={p: params[p].clone() for p in PARTS}, num_samples=10, status=status,
                        round=round_, start={p: start[p].clone() for p in PARTS})


# ---------------------------------------------------------------- the clip


def test_the_joint_clip_scales_all_parts_by_one_factor_to_the_bound():
    deltas = {SHARED: torch.tensor([3.0, 0.0]), PERSONAL: torch.tensor([0.0, 4.0])}  # joint norm 5
    clipped, norm = privacy.clip_jointly(deltas, 1.0)
    assert norm == 5.0
    # One factor C / norm = 0.2 for both parts (less 2^-20 relative, the float32 margin).
    assert torch.allclose(clipped[SHARED], torch.tensor([0.6, 0.0]), rtol=2e-6, atol=0)
    assert torch.allclose(clipped[PERSONAL], torch.tensor([0.0, 0.8]), rtol=2e-6, atol=0)
    total = math.sqrt(sum(float(d.double().square().sum()) for d in clipped.values()))
    assert 1.0 - 2e-6 < total <= 1.0


def test_a_change_within_the_bound_or_of_norm_zero_is_left_as_it_is():
    small = {SHARED: torch.tensor([0.3]), PERSONAL: torch.tensor([0.4])}
    clipped, norm = privacy.clip_jointly(small, 1.0)
    assert abs(norm - 0.5) < 1e-7 and all(torch.equal(clipped[p], small[p]) for p in PARTS)
    zero = {SHARED: torch.zeros(3), PERSONAL: torch.zeros(2)}
    clipped, norm = privacy.clip_jointly(zero, 1.0)
    assert norm == 0.0 and all(torch.equal(clipped[p], zero[p]) for p in PARTS)  # no 0 / 0


def test_the_transform_bounds_every_clients_change_over_both_parts():
    """The change as it travels (parameters minus round start, in float64) has norm <= C up
    to the float32 rounding of start + change: |fl(x) - x| <= 2^-24 |x| per coordinate, so
    at most 2^-24 ||start + change|| in norm."""
    cfg = cfg_with("fl.strategy=fedavg", "privacy.where=server", "privacy.clip_norm=0.5")
    chain = chain_for(cfg)
    assert chain.needs_start and type(chain.transforms[0]).__name__ == "ClientDP"
    gen = torch.Generator().manual_seed(0)
    for round_ in (1, 2, 3):
        for client in range(3):
            start = {SHARED: torch.randn(300, generator=gen), PERSONAL: torch.randn(700, generator=gen)}
            scale = [0.0, 0.01, 1.0][client]  # norm 0, below C, above C
            params = {p: start[p] + scale * torch.randn(start[p].numel(), generator=gen) for p in PARTS}
            before = math.sqrt(sum(float((params[p].double() - start[p].double()).square().sum()) for p in PARTS))
            sent = chain.encode(an_update(client, round_, start, params))
            assert sent.change_norm == pytest.approx(before, rel=1e-6, abs=0)  # the metrics row's, before the clip
            change = torch.cat([sent.parts[p].double() - start[p].double() for p in PARTS])
            slack = 2.0 ** -24 * float(torch.cat([sent.parts[p].double() for p in PARTS]).norm())
            assert float(change.norm()) <= 0.5 + slack
            if before <= 0.5:  # within the bound: sent as trained
                assert all(torch.equal(sent.parts[p], params[p]) for p in PARTS)
            else:
                assert float(change.norm()) > 0.5 * (1 - 1e-5)


def test_an_excluded_clients_zero_rows_stay_zero():
    cfg = cfg_with("fl.strategy=pilot", "privacy.where=client", "privacy.noise_multiplier=1")
    start = {SHARED: torch.ones(4), PERSONAL: torch.ones(5)}
    zeros = {SHARED: torch.zeros(4), PERSONAL: torch.zeros(5)}
    sent = chain_for(cfg).encode(an_update(1, 1, start, zeros, Participation.EXCLUDED_NONFINITE))
    assert all(torch.equal(sent.parts[p], zeros[p]) for p in PARTS)


# ---------------------------------------------------------------- the noise


def test_client_noise_has_the_configured_std_and_is_seeded_by_seed_round_client():
    """where=client: sent - start - clipped change = z C N(0, 1). 200,000 draws estimate the
    std with a relative standard error of 1 / sqrt(2 * 200000) = 0.16%: 1% is over 6 of them."""
    z, c = 2.0, 0.1
    cfg = cfg_with("fl.strategy=pilot", "privacy.where=client", f"privacy.noise_multiplier={z}",
                   f"privacy.clip_norm={c}")
    start = {SHARED: torch.zeros(50_000), PERSONAL: torch.zeros(150_000)}
    params = {SHARED: torch.zeros(50_000), PERSONAL: torch.zeros(150_000)}  # no change: the noise alone
    sent = chain_for(cfg).encode(an_update(2, 3, start, params))
    noise = torch.cat([sent.parts[p] for p in PARTS])
    assert abs(float(noise.std()) / (z * c) - 1) < 0.01 and abs(float(noise.mean())) < 0.01 * z * c
    again = chain_for(cfg).encode(an_update(2, 3, start, params))
    assert all(torch.equal(sent.parts[p], again.parts[p]) for p in PARTS)  # resume: the same draw
    for client, round_ in ((1, 3), (2, 4)):
        other = chain_for(cfg).encode(an_update(client, round_, start, params))
        assert not torch.equal(other.parts[PERSONAL], sent.parts[PERSONAL])
    other_seed = cfg_with("fl.strategy=pilot", "privacy.where=client", f"privacy.noise_multiplier={z}",
                          f"privacy.clip_norm={c}", "run.seed=1")
    assert not torch.equal(chain_for(other_seed).encode(an_update(2, 3, start, params)).parts[SHARED],
                           sent.parts[SHARED])


def test_server_noise_on_the_sum_has_the_configured_std_over_the_good_clients():
    """where=server, FedAvg's one-shot aggregate: n_good * (noisy mean - plain uniform mean)
    is the noise on the sum, N(0, (z C)^2) per coordinate; std within 1% (over 6 standard
    errors with 2 x 120,000 draws). The mean is uniform whatever the sample counts, and
    a non-finite client is left out of it and of n_good."""
    z, c = 1.5, 0.2
    cfg = cfg_with("fl.strategy=fedavg", "privacy.where=server", f"privacy.noise_multiplier={z}",
                   f"privacy.clip_norm={c}")
    noisy = get_strategy("fedavg", cfg).aggregator
    assert type(noisy).__name__ == "ServerNoiseFedAvgServer"
    noisy.round = 4
    gen = torch.Generator().manual_seed(1)
    shared, personal = torch.randn(3, 120_000, generator=gen), torch.randn(3, 120_000, generator=gen)
    personal[1, 7] = float("nan")  # client 1 is excluded
    n = torch.tensor([10, 300, 5])
    got = noisy.aggregate(shared.clone(), personal.clone(), n)
    assert got.excluded == [1]
    good = torch.tensor([True, False, True])
    plain_shared = aggregate.mix(aggregate.average_coefficients(torch.ones(3), good)[None, :], shared, good)[0]
    plain_personal = aggregate.mix(aggregate.average_coefficients(torch.ones(3), good)[None, :], personal, good)[0]
    noise_on_sum = 2 * torch.cat([got.shared[0] - plain_shared, got.personal[0] - plain_personal])
    assert abs(float(noise_on_sum.std()) / (z * c) - 1) < 0.01
    assert torch.equal(got.personal[0], got.personal[2])  # one global model, one noise
    # Another round draws other noise; the same round the same (a resumed round).
    noisy.round = 5
    assert not torch.equal(noisy.aggregate(shared.clone(), personal.clone(), n).shared, got.shared)
    noisy.round = 4
    assert torch.equal(noisy.aggregate(shared.clone(), personal.clone(), n).shared, got.shared)


def test_server_noise_of_a_column_does_not_depend_on_how_the_columns_are_cut():
    """The exchange calls finish per chunk and sub-block (fl.chunk_mb, the device): the noise
    of column j is the same for any cut."""
    whole = privacy.BlockNoise().columns(0, 2, PERSONAL, 0, 3 * privacy.NOISE_BLOCK + 17)
    noise = privacy.BlockNoise()
    cuts = [0, 5, privacy.NOISE_BLOCK - 1, privacy.NOISE_BLOCK + 3, 2 * privacy.NOISE_BLOCK, 3 * privacy.NOISE_BLOCK + 17]
    pieces = torch.cat([noise.columns(0, 2, PERSONAL, a, b) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(whole, pieces)
    assert not torch.equal(whole[:100], privacy.BlockNoise().columns(0, 2, SHARED, 0, 100))


def test_fedadam_takes_its_step_on_the_noisy_uniform_mean():
    cfg = cfg_with("fl.strategy=fedadam", "privacy.where=server", "privacy.noise_multiplier=1")
    noisy, plain = get_strategy("fedadam", cfg).aggregator, get_strategy(
        "fedadam", cfg_with("fl.strategy=fedadam", "fedadam.weighting=uniform")).aggregator
    start = {SHARED: torch.zeros(8), PERSONAL: torch.zeros(20)}
    for agg in (noisy, plain):
        agg.init_server(start)
        agg.round = 1
    shared, personal = torch.randn(3, 8), torch.randn(3, 20)
    n = torch.tensor([1, 2, 3])
    a = noisy.aggregate(shared.clone(), personal.clone(), n)
    b = plain.aggregate(shared.clone(), personal.clone(), n)
    assert not torch.equal(a.personal, b.personal)
    # Its server state moved with the noisy mean: Adam's m is (1 - b1) * (noisy mean - w).
    mean = personal.mean(0)
    assert not torch.allclose(noisy.state["m"][8:], 0.1 * mean)
    assert torch.allclose(plain.state["m"][8:], 0.1 * mean, atol=1e-6)


# ---------------------------------------------------------------- accounting


def direct_epsilon(z, q, rounds, delta, kind):
    """dp_accounting's own answer, composed here round by round."""
    import dp_accounting
    from dp_accounting import pld, rdp

    acc = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    for _ in range(rounds):
        acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_epsilon_is_the_accountants_answer_for_the_sampled_gaussian(kind):
    cfg = cfg_with("fl.strategy=fedavg", "privacy.where=server", "privacy.noise_multiplier=1.3",
                   "fl.clients_per_round=2", "fl.rounds=5", f"privacy.accountant={kind}")
    assert privacy.participation_rate(cfg) == 2 / 3
    # Local noise guards against the server, which sees who sent: no amplification.
    assert privacy.participation_rate(cfg_with("fl.strategy=pilot", "privacy.where=client",
                                               "fl.clients_per_round=2")) == 1.0
    for rounds in (1, 3, 5):
        assert privacy.epsilon_after(cfg, rounds) == pytest.approx(direct_epsilon(1.3, 2 / 3, rounds, 1e-5, kind),
                                                                   rel=1e-9)
    fields = privacy.round_fields(cfg, 3)["privacy"]
    assert fields["epsilon"] == privacy.epsilon_after(cfg, 3) and fields["epsilon_round"] == privacy.epsilon_after(
        cfg, 1)
    assert privacy.epsilon_after(cfg, 1) < privacy.epsilon_after(cfg, 3) < privacy.epsilon_after(cfg, 5)


def test_one_gaussian_round_matches_the_analytic_gaussian_mechanism():
    """Every client, one round, z = 1: the Gaussian mechanism of sensitivity 1 and std 1,
    whose exact delta at epsilon is Phi(1/2 - eps) - e^eps Phi(-1/2 - eps) (Balle and Wang
    2018). PLD's epsilon must give delta 1e-5 there, to its discretisation (1e-4 in the
    privacy loss, so 1e-3 relative in delta is ample)."""
    cfg = cfg_with("fl.strategy=fedavg", "privacy.where=server", "privacy.noise_multiplier=1",
                   "privacy.accountant=pld")
    eps = privacy.epsilon_after(cfg, 1)

    def phi(x):
        return 0.5 * math.erfc(-x / math.sqrt(2))

    exact_delta = phi(0.5 - eps) - math.exp(eps) * phi(-0.5 - eps)
    assert exact_delta == pytest.approx(1e-5, rel=1e-3)
    assert privacy.epsilon_after(cfg_with("fl.strategy=fedavg", "privacy.where=server"), 1) == math.inf  # no noise


def test_a_target_epsilon_solves_the_noise_multiplier_that_reaches_it():
    cfg = cfg_with("fl.strategy=fedavg", "privacy.where=server", "privacy.target_epsilon=4", "fl.rounds=3",
                   "fl.clients_per_round=2")
    z = privacy.noise_multiplier(cfg)
    eps = direct_epsilon(z, 2 / 3, 3, 1e-5, "rdp")
    assert eps <= 4.0 and eps == pytest.approx(4.0, rel=1e-3)


def test_the_budget_stops_before_the_round_that_would_exceed_it():
    cfg = cfg_with("fl.strategy=fedavg", "privacy.where=server", "privacy.noise_multiplier=1", "fl.rounds=5",
                   "privacy.epsilon_budget=6")
    eps = [privacy.epsilon_after(cfg, r) for r in range(1, 6)]
    last = max(r for r in range(1, 6) if eps[r - 1] <= 6)
    assert 1 <= last < 5
    assert all(privacy.over_budget(cfg, r) is None for r in range(1, last + 1))
    message = privacy.over_budget(cfg, last + 1)
    assert f"round {last + 1} would bring epsilon to" in message and f"stops after round {last} of 5" in message


# ---------------------------------------------------------------- adaptive clipping

ADAPTIVE = ("fl.strategy=fedavg", "privacy.where=server", "privacy.adaptive_clip=true", "privacy.noise_multiplier=1",
            "privacy.clip_count_stddev=1", "fl.clients_per_round=2")


def test_the_geometric_rule_moves_c_toward_the_target_quantile():
    """C exp(-eta (b - gamma)), b the (noisy) share of norms within C: C grows when fewer
    than gamma are within it, shrinks when more are, stays when exactly gamma are."""
    grown, count = privacy.next_clip(1.0, [2.0, 3.0, 0.5, 4.0], 0.5, 0.2, 0.0)  # 1 of 4 within
    assert count == 1.0 and grown == 1.0 * math.exp(-0.2 * (0.25 - 0.5)) and grown > 1.0
    shrunk, count = privacy.next_clip(2.0, [0.1, 0.2, 2.0, 3.0], 0.5, 0.2, 0.7)  # 3 within (<= C), noise 0.7
    assert count == 3.7 and shrunk == 2.0 * math.exp(-0.2 * (3.7 / 4 - 0.5)) and shrunk < 2.0
    assert privacy.next_clip(1.5, [1.0, 2.0], 0.5, 0.2, 0.0)[0] == 1.5
    assert privacy.next_clip(1.0, [0.1, 0.2], 0.9, 0.0, 0.3)[0] == 1.0  # clip_lr 0: C fixed


def test_the_updates_noise_and_the_count_noise_compose_to_z():
    """Andrew et al. 2021, Thm 1: (z_delta^-2 + (2 sigma_b)^-2)^-1/2 = z."""
    for z, sigma_b in ((1.0, 1.0), (0.5, 5.0), (2.0, 1.01)):
        z_delta = privacy.update_multiplier(z, sigma_b)
        assert z_delta == (z ** -2 - (2 * sigma_b) ** -2) ** -0.5 and z_delta > z
        assert (z_delta ** -2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)
    assert privacy.update_multiplier(0.0, 0.1) == 0.0  # no noise: clipping only
    with pytest.raises(ValueError):
        privacy.update_multiplier(1.0, 0.5)
    cfg = cfg_with(*ADAPTIVE)
    assert privacy.update_noise_multiplier(cfg) == privacy.update_multiplier(1.0, 1.0)
    # The server's noise uses z_delta; the accountant, z.
    assert get_strategy("fedavg", cfg).aggregator.dp_z == privacy.update_multiplier(1.0, 1.0)
    assert privacy.epsilon_after(cfg, 2) == pytest.approx(direct_epsilon(1.0, 2 / 3, 2, 1e-5, "rdp"), rel=1e-9)
    # sigma_b 0: the paper's expected participants / 20 = 2 / 20, too little for z = 1.
    low = cfg_with(*ADAPTIVE[:-2], "fl.clients_per_round=2")
    assert privacy.count_stddev(low) == 0.1
    with pytest.raises(ConfigError, match=r"sigma_b = 0.1 .* must exceed half the noise multiplier z = 1.*"
                                          r"set privacy.clip_count_stddev above 0.5"):
        privacy.check(low)
    privacy.check(cfg)


def test_the_count_noise_is_seeded_by_seed_and_round():
    """The next C is a pure function of (seed, round, norms, C): a resumed round gets it again."""
    cfg = cfg_with(*ADAPTIVE)
    rows = [{"participation": "participated", "change_norm": 0.3}, {"participation": "not_selected"},
            {"participation": "participated", "change_norm": 0.05, "evaluated": False}]
    one = privacy.round_fields(cfg, 3, rows, 0.1)["privacy"]
    assert one == privacy.round_fields(cfg, 3, rows, 0.1)["privacy"]
    noise = privacy.count_stddev(cfg) * privacy.count_noise(cfg.run.seed, 3)
    assert one["clip_norm"] == 0.1 and one["clip_participants"] == 2 and one["clip_count"] == 1 + noise
    assert one["clip_norm_next"] == 0.1 * math.exp(-0.2 * ((1 + noise) / 2 - 0.5))
    assert privacy.round_fields(cfg, 4, rows, 0.1)["privacy"]["clip_norm_next"] != one["clip_norm_next"]
    assert privacy.count_noise(1, 3) != privacy.count_noise(0, 3)
    # Round 0 (no participant): C stays, nothing drawn.
    assert privacy.round_fields(cfg, 0, [{"value": 1.0}], 0.1)["privacy"]["clip_norm_next"] == 0.1


def test_every_rank_takes_c_from_the_last_round_of_rank_0s_history():
    class World:  # one rank: bcast_object hands back rank 0's value
        rank = 0

        def bcast_object(self, value, root=0):
            return value

    cfg = cfg_with(*ADAPTIVE)
    chain, aggregator = chain_for(cfg), get_strategy("fedavg", cfg).aggregator
    history = [{"round": 0, "privacy": {"clip_norm_next": 1.0}}, {"round": 1, "privacy": {"clip_norm_next": 0.37}}]
    assert privacy.share_clip(cfg, World(), history, chain, aggregator) == 0.37
    assert chain.transforms[0].clip == 0.37 and aggregator.dp_clip == 0.37
    assert aggregator.dp_std == privacy.update_multiplier(1.0, 1.0) * 0.37
    fixed = cfg_with("fl.strategy=fedavg", "privacy.where=server", "privacy.clip_norm=0.2")
    assert privacy.share_clip(fixed, None, history, chain_for(fixed), None) == 0.2  # no collective


def test_adaptive_clipping_is_refused_where_the_server_cannot_see_the_bits():
    for where in ("client", "none"):
        with pytest.raises(ConfigError, match=f"privacy.adaptive_clip=true adapts C on a trusted server .* but "
                                              f"privacy.where={where}: set privacy.where=server"):
            cfg_with("fl.strategy=fedavg", f"privacy.where={where}", "privacy.adaptive_clip=true")
    with pytest.raises(ConfigError, match="privacy.adaptive_clip=true needs each participant's clip bit .* "
                                          "privacy.secure_aggregation=true hides"):
        cfg_with("fl.strategy=fedavg", "privacy.where=server", "privacy.adaptive_clip=true",
                 "privacy.secure_aggregation=true")
    with pytest.raises(ConfigError, match=r"privacy.clip_quantile must lie in \[0, 1\], got 1.5"):
        cfg_with(*ADAPTIVE, "privacy.clip_quantile=1.5")


# ---------------------------------------------------------------- config


def test_server_noise_is_refused_for_strategies_that_use_individual_updates():
    for strategy in ("pilot", "feddpa", "shepherd", "local", "centralized"):
        with pytest.raises(ConfigError, match=f"privacy.where=server .* fl.strategy={strategy} uses individual "
                                              "updates .* use privacy.where=client"):
            cfg_with(f"fl.strategy={strategy}", "privacy.where=server")
    for strategy in ("fedavg", "fedprox", "fedadam"):
        cfg_with(f"fl.strategy={strategy}", "privacy.where=server")
    with pytest.raises(ConfigError, match="fl.strategy=local sends none"):
        cfg_with("fl.strategy=local", "privacy.where=client")
    # with secure aggregation only client noise (each client noises before masking)
    with pytest.raises(ConfigError, match="privacy.secure_aggregation=true with privacy.where=server is not supported"):
        cfg_with("fl.strategy=fedavg", "privacy.where=server", "privacy.secure_aggregation=true")
    cfg_with("fl.strategy=fedavg", "privacy.where=client", "privacy.secure_aggregation=true")
    with pytest.raises(ConfigError, match="the server cannot decode a masked row"):
        cfg_with("fl.strategy=fedavg", "privacy.secure_aggregation=true", "fl.codec=int8")


def test_privacy_keys_are_checked_with_the_key_named():
    with pytest.raises(ConfigError, match="give one of them"):
        cfg_with("privacy.where=client", "privacy.noise_multiplier=1", "privacy.target_epsilon=2")
    with pytest.raises(ConfigError, match=r"privacy.clip_norm must be > 0, got 0.0"):
        cfg_with("privacy.where=client", "privacy.clip_norm=0")
    with pytest.raises(ConfigError, match=r"privacy.delta must lie in \(0, 1\)"):
        cfg_with("privacy.delta=0")
    with pytest.raises(ConfigError, match="privacy.where must be one of none, server, client"):
        cfg_with("privacy.where=both")
    with pytest.raises(ConfigError, match="privacy.where=none accounts nothing"):
        cfg_with("privacy.epsilon_budget=3")
    with pytest.raises(ConfigError, match="client_dp is applied by privacy.where itself"):
        chain_for(cfg_with("privacy.where=client", "fl.transforms=[client_dp]"))


def test_without_privacy_nothing_changes():
    cfg = cfg_with()
    assert cfg.privacy.where == "none" and privacy.round_fields(cfg, 2) == {} and privacy.log_suffix(cfg, 2) == ""
    assert privacy.norm_width(cfg) == 0 and privacy.norm_field(cfg, 1.0) == {}  # no change_norm in the rows
    assert [type(t).__name__ for t in chain_for(cfg).transforms] == ["WireDtype"]
    assert type(get_strategy("fedavg", cfg_with("fl.strategy=fedavg")).aggregator).__name__ == "FedAvgServer"
    assert cfg.hash() == load_config(SMOKE, ["fl.num_clients=3", "fl.client_tasks=[vqa, caption, grounding]",
                                             "pilot.top_m=1", "privacy.where=none", "privacy.delta=1e-5"]).hash()
