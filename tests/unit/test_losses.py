"""Pilot's losses and the CT-MoA reference against direct formulas on small tensors."""

import torch
import torch.nn.functional as F

from pilot_hpc.model.connector import difference_loss
from pilot_hpc.model.ctmoa import (AdapterWeights, ctmoa_reference, load_balance_loss, mlp_expert_index,
                                   router_reference, z_loss)


def naive_difference_loss(x_t, x_s):
    """The definition literally (docs/method.md): per sample, the C x C product of row-normalised features."""
    losses = []
    for a, b in zip(x_t, x_s):  # [N, C]
        a = a / (a.norm(dim=-1, keepdim=True) + 1e-6)
        b = b / (b.norm(dim=-1, keepdim=True) + 1e-6)
        losses.append(((a.T @ b) ** 2).mean())
    return torch.stack(losses).mean()


def test_difference_loss_gram_form_equals_naive_form():
    torch.manual_seed(0)
    x_t, x_s = torch.randn(3, 7, 11, dtype=torch.float64), torch.randn(3, 7, 11, dtype=torch.float64)
    got = difference_loss(x_t, x_s)
    # fp64 inputs but the loss computes in fp32 (as it does in training): 1e-6 relative.
    torch.testing.assert_close(got.double(), naive_difference_loss(x_t, x_s), rtol=1e-6, atol=1e-9)


def test_difference_loss_is_zero_for_orthogonal_features_and_detaches_norms():
    # x_t^T x_s = sum_n x_t[n] x_s[n]^T vanishes when no token carries both features.
    x_t = torch.zeros(1, 2, 4)
    x_s = torch.zeros(1, 2, 4)
    x_t[0, 0, 0] = 3.0
    x_s[0, 1, 1] = 2.0
    assert difference_loss(x_t, x_s).item() == 0.0
    # Aligned features on the same token: one entry of x_t^T x_s is 1 (unit rows), mean 1/C^2.
    x_s[0, 0, 0] = 5.0
    assert abs(difference_loss(x_t, x_s).item() - 1.0 / 16) < 1e-6
    a = torch.randn(2, 3, 5, requires_grad=True)
    b = torch.randn(2, 3, 5)
    difference_loss(a, b).backward()
    # The gradient flows through the direction only (norms detached): it is not zero.
    assert a.grad.abs().sum() > 0


def direct_aux_losses(h, w_r):
    logits = h.reshape(-1, h.shape[-1]).double() @ w_r.double().T  # [M, T]
    p = logits.softmax(-1)
    num_experts = w_r.shape[0]
    d = torch.stack([(p.argmax(-1) == i).double().mean() for i in range(num_experts)])
    r = p.mean(0)
    l_b = num_experts * (d * r).sum()
    l_z = (torch.logsumexp(logits, -1) ** 2).mean()
    return l_b, l_z


def test_load_balance_and_z_loss_match_direct_formulas():
    torch.manual_seed(1)
    h = torch.randn(2, 5, 6)
    w_r = torch.randn(3, 6)
    _, stats = router_reference(h, w_r)
    l_b, l_z = direct_aux_losses(h, w_r)
    torch.testing.assert_close(load_balance_loss(stats).double(), l_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_loss(stats).double(), l_z, rtol=1e-5, atol=1e-6)
    assert stats.counts.sum().item() == 10 and stats.num_tokens == 10


def test_balanced_uniform_router_gives_lb_one():
    # All-zero router: P = 1/T everywhere; argmax picks expert 0 -> D = (1, 0, 0), R = 1/3 -> L_b = 1.
    _, stats = router_reference(torch.randn(4, 6), torch.zeros(3, 6))
    assert load_balance_loss(stats).item() == 1.0
    torch.testing.assert_close(z_loss(stats), torch.log(torch.tensor(3.0)) ** 2)


def test_ctmoa_reference_matches_a_per_token_loop():
    torch.manual_seed(2)
    num_tasks, cv, c = 3, 5, 7
    h = torch.randn(2, 4, cv)
    w_r = torch.randn(num_tasks, cv)
    mlps = [AdapterWeights(torch.randn(c, cv), torch.randn(c), torch.randn(c, c), torch.randn(c))
            for _ in range(2 * num_tasks - 1)]
    expert_of = mlp_expert_index(num_tasks)
    assert expert_of == [0, 1, 1, 2, 2]
    res = ctmoa_reference(h, w_r, mlps, expert_of)
    for b in range(2):
        for n in range(4):
            x = h[b, n]
            p = (w_r @ x).softmax(-1)
            mlp = [m.w2 @ F.gelu(m.w1 @ x + m.b1) + m.b2 for m in mlps]
            expected = p[0] * mlp[0] + p[1] * (mlp[1] + mlp[2]) + p[2] * (mlp[3] + mlp[4])
            torch.testing.assert_close(res.out[b, n], expected, rtol=1e-5, atol=1e-5)
