"""Server aggregation against hand-computed examples (no MPI, no model)."""

import math

import pytest
import torch

from pilot_hpc.fl import aggregate


def test_task_aware_average_hand_computed():
    # Clients 0, 2 do task 0 with n = 1, 3; clients 1, 3 do task 1 with n = 2, 2.
    u = torch.tensor([[1.0, 0.0], [10.0, 10.0], [5.0, 4.0], [20.0, 30.0]])
    n = torch.tensor([1, 2, 3, 2])
    tasks = torch.tensor([0, 1, 0, 1])
    out = aggregate.task_aware_average(u, n, tasks, 2)
    expected = torch.tensor([[(1 * 1 + 3 * 5) / 4, (0 + 3 * 4) / 4], [15.0, 20.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_task_without_client_is_an_error():
    with pytest.raises(ValueError, match="task 2 has no client"):
        aggregate.task_aware_average(torch.ones(2, 3), torch.tensor([1, 1]), torch.tensor([0, 1]), 3)


def test_weighted_average_is_fedavg():
    u = torch.tensor([[0.0, 4.0], [4.0, 0.0]])
    out = aggregate.weighted_average(u, torch.tensor([1, 3]))
    torch.testing.assert_close(out, torch.tensor([3.0, 1.0]))


def test_distances_from_gram_match_cdist_with_small_chunks():
    torch.manual_seed(0)
    u = torch.randn(5, 37)
    d = aggregate.pairwise_distances(u)
    ref = torch.cdist(u.double(), u.double())
    torch.testing.assert_close(d, ref, rtol=1e-9, atol=1e-9)
    # Chunked Gram accumulation equals the one-shot product (chunk does not divide 37).
    torch.testing.assert_close(aggregate.gram_matrix(u, chunk=5), u.double() @ u.double().T)


def test_ata_hand_computed_example():
    # Three clients on a line at 0, 1, 3 (1-D updates); M = 1: each mixes its nearest.
    u = torch.tensor([[0.0], [1.0], [3.0]])
    n = torch.tensor([1, 1, 2])
    out = aggregate.ata_aggregate(u, n, top_m=1)
    # client 0: nearest 1 (d=1), S = 1 -> 1/2 * 0 + 1/2 * 1 = 0.5
    # client 1: nearest 0 (d=1) vs 2 (d=2) -> 0; S = 1 -> 0.5 * 1 + 0.5 * 0 = 0.5
    # client 2: nearest 1 (d=2), S = 1, n_k = 2 -> 2/3 * 3 + 1/3 * 1 = 7/3
    torch.testing.assert_close(out, torch.tensor([[0.5], [0.5], [7 / 3]]), rtol=0, atol=1e-6)


def test_ata_m_equals_k_minus_one_uses_inverse_distance_weights():
    u = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    n = torch.tensor([2, 1, 1, 4])
    coef = aggregate.ata_coefficients(aggregate.pairwise_distances(u), n, top_m=3)
    # Row 0: distances 1, 2, 5 -> inverse 1, 1/2, 1/5 (sum 1.7); S = 6, n_0 = 2.
    inv = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    expected = torch.cat([torch.tensor([2 / 8], dtype=torch.float64), (6 / 8) * inv / inv.sum()])
    torch.testing.assert_close(coef[0], expected)
    torch.testing.assert_close(coef.sum(dim=1), torch.ones(4, dtype=torch.float64))
    out = aggregate.ata_aggregate(u, n, top_m=3)
    torch.testing.assert_close(out[0], (expected.float() @ u), rtol=1e-6, atol=1e-6)


def test_ata_zero_distance_gets_a_finite_dominant_weight():
    # Clients 0 and 1 are identical: d_01 = 0 must not give inf or nan.
    u = torch.tensor([[1.0, 1.0], [1.0, 1.0], [5.0, 5.0], [9.0, 9.0]])
    n = torch.tensor([1, 1, 1, 1])
    coef = aggregate.ata_coefficients(aggregate.pairwise_distances(u), n, top_m=2, eps=1e-12)
    assert torch.isfinite(coef).all()
    # Row 0: neighbours 1 (d=0 -> 1/eps) and 2 (d=4*sqrt2): client 1 takes ~all of S/(n+S) = 2/3.
    assert coef[0, 1].item() == pytest.approx(2 / 3, abs=1e-9)
    assert coef[0, 2].item() == pytest.approx(0.0, abs=1e-9)
    out = aggregate.ata_aggregate(u, n, top_m=2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], torch.tensor([1.0, 1.0]))


def test_ata_rejects_m_not_below_k():
    with pytest.raises(ValueError, match="1 <= M < K"):
        aggregate.ata_coefficients(torch.zeros(3, 3), torch.ones(3), top_m=3)


def test_bf16_updates_mix_in_fp32_and_return_bf16():
    u = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    out = aggregate.task_aware_average(u, torch.tensor([1, 1]), torch.tensor([0, 0]), 1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.tensor([[2.0, 3.0]]))
    assert math.isfinite(aggregate.pairwise_distances(u)[0, 1].item())


def test_a_nan_client_changes_no_other_clients_result():
    """Pilot's server step with client 2's update NaN equals the step without client 2."""
    from pilot_hpc.config import load_config
    from pilot_hpc.fl.strategies import get_strategy

    torch.manual_seed(3)
    cfg = load_config(None, ["pilot.top_m=3"])
    pilot = get_strategy("pilot", cfg).aggregator
    visual, text = torch.randn(9, 11), torch.randn(9, 13)
    n = torch.tensor([5, 6, 7, 5, 6, 7, 5, 6, 7])
    tasks = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    bad_v, bad_t = visual.clone(), text.clone()
    bad_v[2] = float("nan")
    bad_t[2, 4] = float("inf")
    got = pilot.aggregate(bad_v, bad_t, n)
    assert got.excluded == [2]
    keep = torch.tensor([k for k in range(9) if k != 2])
    ref_shared = aggregate.task_aware_average(visual[keep], n[keep], tasks[keep], 3)
    ref_personal = aggregate.ata_aggregate(text[keep], n[keep], 3)
    torch.testing.assert_close(got.shared, ref_shared, rtol=0, atol=0)
    torch.testing.assert_close(got.personal[keep], ref_personal, rtol=0, atol=0)
    assert torch.isnan(got.personal[2]).all()  # the bad client installs nothing


def test_a_task_whose_clients_are_all_bad_gets_a_nan_row():
    u = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 4.0]])
    good = aggregate.finite_rows(u)
    out = aggregate.task_aware_average(u, torch.tensor([1, 1, 1]), torch.tensor([0, 1, 0]), 2, good)
    torch.testing.assert_close(out[0], torch.tensor([2.0, 3.0]))
    assert torch.isnan(out[1]).all()
