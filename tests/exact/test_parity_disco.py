"""The f-DPG loss against naver/disco's reduction, re-expressed in a few lines, and the two baseline
questions it settles by exact enumeration of the toy space (27 sequences):

- an offline proposal q ≠ π: the baseline must multiply the importance ratio, (π/q)(r_f − b), as
  disco does; subtracting b from R = (π/q)·r_f biases the gradient;
- the reverse-KL pseudo-reward keeps disco's constant −log Z − 1: the expected gradient is the same
  without it, only the variance of the per-sample gradient changes (both reported below).
"""

import math

import pytest
import torch
from toy import SEQUENCES, random_logits, sample, token_logprobs

from reasoning.objectives.bayes import (
    baselined_advantage,
    f_pseudo_reward,
    log_target,
    pointwise_log_target,
    pseudo_reward,
    pseudo_reward_loss,
)

BETA = 0.5
DIVERGENCES = ("fkl", "rkl", "js", "tv")


def reference_f_prime(divergence, log_t):
    """f′(t) at log t = log(π/p), as in disco's losses (kl.py, reverse_kl.py, js.py, tv.py)."""
    if divergence == "fkl":
        return -torch.exp(-log_t)
    if divergence == "rkl":
        return log_t + 1
    if divergence == "js":
        return math.log(2.0) - torch.nn.functional.softplus(-log_t)
    return torch.sign(log_t) / 2.0


def reference_f_divergence_loss(divergence, log_q, log_target_scores, log_pi, z, baseline):
    # re-expresses naver/disco/disco/tuners/losses/f_divergence.py (FDivergenceLoss.__call__)
    log_t = log_pi.detach() - (log_target_scores - torch.log(z))
    pseudo = -reference_f_prime(divergence, log_t)
    advantage = pseudo - baseline if baseline is not None else pseudo
    ratios = (log_pi.detach() - log_q).exp()
    return (ratios * (-advantage) * log_pi).mean()


def seq_logp(logits):
    return token_logprobs(logits.double(), SEQUENCES).sum(-1)


def toy_target(kind):
    log_base = seq_logp(random_logits(0))
    reward = (SEQUENCES == 1).sum(-1).double() + 0.5 * (SEQUENCES[:, 0] == 2).double()
    if kind == "tilted":
        return log_target(log_base, reward, BETA)
    return pointwise_log_target(log_base, (SEQUENCES == 2).any(-1))


def per_sequence_gradients(theta, log_pi):
    """∇_θ log π(x) for each of the 27 sequences, [27, P]."""
    rows = [torch.autograd.grad(log_pi[i], theta, retain_graph=True)[0].flatten() for i in range(len(log_pi))]
    return torch.stack(rows)


# ------------------------------------------------------------------ values and gradients vs disco


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_pseudo_reward_loss_equals_disco_f_divergence_loss(divergence):
    g = torch.Generator().manual_seed(1)
    n = 64
    log_pi = (-3.0 + torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    log_q = log_pi.detach() + 0.7 * torch.randn(n, generator=g, dtype=torch.float64)  # q ≠ π
    log_scores = -3.0 + 1.5 * torch.randn(n, generator=g, dtype=torch.float64)  # log P
    z = torch.tensor(0.8, dtype=torch.float64)
    for b in (None, 0.37, -1.2):
        reference = reference_f_divergence_loss(divergence, log_q, log_scores, log_pi, z, b)
        ours, advantage = pseudo_reward_loss(
            divergence, log_scores, z.log(), log_pi, log_q, 0.0 if b is None else b
        )
        assert ours.item() == pytest.approx(reference.item(), rel=1e-12, abs=1e-14)
        (reference_grad,) = torch.autograd.grad(reference, log_pi)
        (our_grad,) = torch.autograd.grad(ours, log_pi)
        assert torch.allclose(our_grad, reference_grad, rtol=1e-12, atol=1e-15)
        assert reference_grad.abs().max() > 1e-4
        # the pieces: R = (π/q)·r_f with r_f = −f′(π/p), and A = R − b·π/q
        ratio = (log_pi.detach() - log_q).exp()
        r_f = f_pseudo_reward(divergence, log_scores, z.log(), log_pi)
        assert torch.allclose(pseudo_reward(divergence, log_scores, z.log(), log_pi, log_q), ratio * r_f)
        assert torch.allclose(advantage, ratio * (r_f - (b or 0.0)), rtol=1e-12)


# ------------------------------------------------------------------ item: the offline baseline


@pytest.mark.parametrize("kind", ["tilted", "pointwise"])
def test_offline_moving_average_baseline_keeps_the_exact_gradient(kind):
    """E_q[∇ loss] by enumeration, q = a perturbed copy of π: equal to ∇KL(p‖π) with the baseline
    multiplying π/q, for every b; with b subtracted from R (the old form) it is not."""
    log_p = toy_target(kind)
    log_z = torch.logsumexp(log_p, 0)
    theta = random_logits(6).double().requires_grad_(True)
    log_pi = seq_logp(theta)
    log_q = seq_logp(theta.detach() + 0.5 * random_logits(7).double())  # an older snapshot of π
    q = log_q.exp()
    jacobian = per_sequence_gradients(theta, log_pi)
    p_norm = (log_p - log_z).exp()
    (exact,) = torch.autograd.grad(-(p_norm * log_pi).sum(), theta, retain_graph=True)  # ∇ KL(p‖π)
    exact = exact.flatten()

    def expected_gradient(advantage):  # E_q[−A ∇log π] = −Σ_x q(x) A(x) ∇log π(x)
        return -(q.unsqueeze(-1) * advantage.unsqueeze(-1) * jacobian).sum(0)

    reward = pseudo_reward("fkl", log_p, log_z, log_pi, log_q)  # p/q
    r_f = f_pseudo_reward("fkl", log_p, log_z, log_pi)  # p/π
    # what each moving average settles to: disco's, the mean of r_f under q; the old one, of R under q (= 1)
    disco_b, old_b = (q * r_f).sum(), (q * reward).sum()
    assert old_b.item() == pytest.approx(1.0, abs=1e-12)
    for b in (disco_b, old_b, torch.tensor(-2.5, dtype=torch.float64)):
        fixed = expected_gradient(baselined_advantage(reward, b, log_pi, log_q))
        assert torch.allclose(fixed, exact, atol=1e-12, rtol=1e-10)
    old = expected_gradient(reward - old_b)  # the old form: R − b
    share = (old @ exact / (exact @ exact)).item()  # the component along the true gradient
    error = ((old - exact).norm() / exact.norm()).item()
    print(
        f"{kind}: old form E[g]·∇KL/|∇KL|² = {share:.3f}, |E[g] − ∇KL|/|∇KL| = {error:.3f} (1 and 0 after the fix)"
    )
    assert error > 0.1
    # on-policy (q = π) both forms agree: π/q = 1
    on = baselined_advantage(pseudo_reward("fkl", log_p, log_z, log_pi, log_pi), 0.7, log_pi, log_pi)
    assert torch.allclose(on, pseudo_reward("fkl", log_p, log_z, log_pi, log_pi) - 0.7)


def test_offline_moving_average_baseline_is_unbiased_by_monte_carlo():
    """Batches of 32 from q, b = disco's windowed mean of r_f over earlier batches (none at first):
    the mean gradient is within 4 standard errors of ∇KL(p‖π) along ∇KL and along the direction in
    which the old form is biased, Σ_x q(x)∇log π(x); the old form (b = the window's mean of R,
    subtracted from R) is more than 8 standard errors off along the latter."""
    log_p = toy_target("tilted")
    log_z = torch.logsumexp(log_p, 0)
    theta = random_logits(6).double().requires_grad_(True)
    log_pi = seq_logp(theta)
    proposal = theta.detach() + 0.5 * random_logits(7).double()
    log_q = seq_logp(proposal)
    p_norm = (log_p - log_z).exp()
    (exact,) = torch.autograd.grad(-(p_norm * log_pi).sum(), theta, retain_graph=True)
    exact = exact.flatten()
    bias = (log_q.exp().unsqueeze(-1) * per_sequence_gradients(theta, log_pi)).sum(0)
    directions = torch.stack([exact / exact.norm(), bias / bias.norm()])
    draws = sample(proposal, 400 * 32, seed=3)
    index = (draws * torch.tensor([9, 3, 1])).sum(-1).view(400, 32)
    window: list[float] = []  # disco: −f′(π/p) = p/π
    old_window: list[float] = []  # the old trainer: R = p/q
    fixed, old = [], []
    for rows in index:
        b = sum(window) / len(window) if window else 0.0
        loss, _ = pseudo_reward_loss("fkl", log_p[rows], log_z, log_pi[rows], log_q[rows], b)
        fixed.append(directions @ torch.autograd.grad(loss, theta, retain_graph=True)[0].flatten())
        reward = pseudo_reward("fkl", log_p[rows], log_z, log_pi[rows], log_q[rows])
        b_old = sum(old_window) / len(old_window) if old_window else 0.0
        old_loss = -((reward - b_old) * log_pi[rows]).mean()
        old.append(directions @ torch.autograd.grad(old_loss, theta, retain_graph=True)[0].flatten())
        window = (window + f_pseudo_reward("fkl", log_p[rows], log_z, log_pi[rows]).tolist())[-1024:]
        old_window = (old_window + reward.tolist())[-1024:]
    truth = directions @ exact
    for estimates, unbiased in ((torch.stack(fixed), True), (torch.stack(old), False)):
        se = estimates.std(0) / len(estimates) ** 0.5
        z = (estimates.mean(0) - truth) / se
        print(f"{'fixed' if unbiased else 'old'}: z-scores along ∇KL and the bias direction {z.tolist()}")
        if unbiased:
            assert z.abs().max() < 4
        else:
            assert z[1].abs() > 8


# ------------------------------------------------------------------ item: the reverse-KL constant


@pytest.mark.parametrize("proposal", ["on-policy", "off-policy"])
def test_rkl_constant_changes_the_variance_not_the_expected_gradient(proposal):
    log_p = toy_target("tilted")
    log_z = torch.logsumexp(log_p, 0)
    theta = random_logits(6).double().requires_grad_(True)
    log_pi = seq_logp(theta)
    log_q = log_pi.detach() if proposal == "on-policy" else seq_logp(theta.detach() + 0.5 * random_logits(7))
    q = log_q.exp()
    jacobian = per_sequence_gradients(theta, log_pi)
    kept = pseudo_reward("rkl", log_p, log_z, log_pi, log_q)  # disco: (π/q)(log p − log π − 1)
    ratio = (log_pi.detach() - log_q).exp()
    dropped = kept + ratio * (log_z + 1.0)  # (π/q)(log P − log π): without −log Z − 1
    (exact,) = torch.autograd.grad(
        ((log_pi.exp()) * (log_pi - log_p + log_z)).sum(), theta, retain_graph=True
    )  # ∇ KL(π‖p)
    moments = {}
    for name, reward in (("kept", kept), ("dropped", dropped)):
        per_sample = reward.unsqueeze(-1) * jacobian  # R(x)·∇log π(x)
        mean = (q.unsqueeze(-1) * per_sample).sum(0)
        assert torch.allclose(-mean, exact.flatten(), atol=1e-12, rtol=1e-10)
        moments[name] = (q * (per_sample - mean).pow(2).sum(-1)).sum().item()  # E_q|g − E g|²
    print(
        f"{proposal}: total variance of R·∇log π, constant kept {moments['kept']:.4f}, "
        f"dropped {moments['dropped']:.4f} (log Z = {log_z.item():.3f})"
    )
    assert abs(moments["kept"] - moments["dropped"]) > 1e-3 * moments["kept"]
    # with a baseline b·π/q the constant cancels: GDC++'s coefficient c = E_π[r_f] (here exact)
    # moves by the same constant, so the advantage is identical to the last bit that matters
    c_kept = (log_pi.exp() * kept / ratio).sum()
    c_dropped = (log_pi.exp() * dropped / ratio).sum()
    assert torch.allclose(
        baselined_advantage(kept, c_kept, log_pi, log_q),
        baselined_advantage(dropped, c_dropped, log_pi, log_q),
        atol=1e-12,
    )
