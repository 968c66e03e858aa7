"""The stale-rollout correction `off_policy_weights` against exact enumeration.

One-step-off rollouts are sampled by a behaviour policy μ (the weights of an earlier optimizer step,
warped by temperature / top-k / top-p) while the gradient is wanted for π (the current policy under
the same warpers). A single-token toy (6 tokens, temperature 0.8, top-k 4 / top-p 0.9) is enumerated:
the on-policy gradient ∇_θ Σ_y π'_θ(y) A(y) by autograd, the corrected estimator's expectation as
Σ_y μ'(y) w(y) A(y) ∇log π'_θ(y), and a seeded Monte Carlo mean of the estimator within a few
standard errors. A sequence toy (every sequence of 3 tokens over 3, `toy.py`) shows what token-level
weights leave uncorrected: the behaviour policy's prefixes and continuations.
"""

import pytest
import torch
from toy import SEQUENCES, prefix_index, random_logits, token_logprobs

from reasoning.objectives.logprobs import warp_logits
from reasoning.objectives.policy import off_policy_weights

TAU = 0.8
THETA = torch.tensor([1.2, 0.9, 0.5, 0.1, -0.4, -1.0], dtype=torch.float64)
REWARD = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, 2.0], dtype=torch.float64)
# a lag that keeps the nucleus ({0, 1, 2, 3}), and one that moves token 2 out of μ's top-p nucleus
SMALL = torch.tensor([-0.15, 0.1, 0.05, 0.12, -0.05, 0.0], dtype=torch.float64)
SWAP = torch.tensor([0.0, 0.0, -0.5, 0.6, 0.0, 0.0], dtype=torch.float64)

ATOL = 1e-6  # `warp_logits` works in float32


def warped(logits: torch.Tensor, top_k: int = 4, top_p: float = 0.9) -> torch.Tensor:
    """log π'(y): the sampling distribution's log-probs, renormalised over the kept tokens (−inf outside)."""
    return torch.log_softmax(warp_logits(logits, TAU, top_k, top_p).double(), dim=-1)


def on_policy_gradient(theta: torch.Tensor, **warpers) -> torch.Tensor:
    theta = theta.clone().requires_grad_(True)
    objective = (warped(theta, **warpers).exp() * REWARD).sum()
    return torch.autograd.grad(objective, theta)[0]


def score_rows(theta: torch.Tensor, **warpers) -> torch.Tensor:
    """∇_θ log π'_θ(y) for every token y, `[V, V]` (rows of filtered tokens are multiplied by w = 0)."""
    return torch.autograd.functional.jacobian(lambda t: warped(t, **warpers), theta)


def expected_estimate(theta, behaviour_logits, cap, **warpers):
    """Σ_y μ'(y) w(y) A(y) ∇log π'(y), and the weights w `[V]`."""
    logp, behaviour = warped(theta, **warpers), warped(behaviour_logits, **warpers)
    weights, _ = off_policy_weights(logp.unsqueeze(0), behaviour.unsqueeze(0), cap)
    weights = weights[0]
    mu = behaviour.exp()
    rows = score_rows(theta, **warpers)
    terms = torch.where((mu > 0).unsqueeze(1), mu.unsqueeze(1) * (weights * REWARD).unsqueeze(1) * rows, 0.0)
    return terms.sum(0), weights


def test_weights_are_capped_ratios_with_zero_for_filtered_tokens_and_one_at_padding():
    old = torch.tensor([[-1.0, -float("inf"), -0.5, -2.0]])
    behaviour = torch.tensor([[-2.0, -1.0, -0.5, -float("inf")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    weights, stats = off_policy_weights(old, behaviour, cap=2.0, mask=mask)
    # e^1 > 2 is capped; π_old = 0 gives 0 (not NaN); padding gives 1 whatever its values
    assert torch.equal(weights, torch.tensor([[2.0, 0.0, 1.0, 1.0]]))
    assert stats["truncated"].item() == pytest.approx(1 / 3)
    assert stats["filtered"].item() == pytest.approx(1 / 3)
    assert stats["weight_mean"].item() == pytest.approx(1.0)
    both = off_policy_weights(torch.tensor([-float("inf")]), torch.tensor([-float("inf")]), cap=2.0)[0]
    assert torch.equal(both, torch.tensor([0.0]))
    needs = old.clone().requires_grad_(True)
    assert not off_policy_weights(needs, behaviour, cap=2.0)[0].requires_grad
    with pytest.raises(ValueError, match="cap must be > 0"):
        off_policy_weights(old, behaviour, cap=0.0)


def test_corrected_single_token_estimator_is_unbiased_for_the_on_policy_gradient():
    behaviour_logits = THETA + SMALL
    logp, behaviour = warped(THETA), warped(behaviour_logits)
    assert torch.equal(torch.isfinite(logp), torch.isfinite(behaviour))  # the same nucleus
    assert torch.isfinite(logp).sum() == 4  # top-k / top-p do cut the vocabulary
    exact = on_policy_gradient(THETA)
    expected, weights = expected_estimate(THETA, behaviour_logits, cap=10.0)
    assert weights.max() < 10.0  # no truncation
    torch.testing.assert_close(expected, exact, rtol=0, atol=ATOL)
    # without the correction the stale samples estimate another gradient
    uncorrected = (behaviour.exp().unsqueeze(1) * REWARD.unsqueeze(1) * score_rows(THETA)).nansum(0)
    assert (uncorrected - exact).abs().max() > 0.02

    # Monte Carlo, in the trainer's layout: N sampled tokens as [N, 1] rows with a mask
    n = 40000
    draws = torch.multinomial(behaviour.exp(), n, replacement=True, generator=torch.Generator().manual_seed(0))
    w, _ = off_policy_weights(logp[draws].unsqueeze(1), behaviour[draws].unsqueeze(1), 10.0, torch.ones(n, 1))
    samples = w * REWARD[draws].unsqueeze(1) * score_rows(THETA)[draws]
    mean, se = samples.mean(0), samples.std(0) / n**0.5
    assert ((mean - exact).abs() <= 4 * se + ATOL).all(), (mean, exact, se)
    plain = REWARD[draws].unsqueeze(1) * score_rows(THETA)[draws]
    assert ((plain.mean(0) - exact).abs() > 8 * se).any()  # the MC test can tell the two apart


def test_unrenormalised_ratios_scale_the_gradient_by_the_nucleus_masses():
    # μ puts more mass outside the nucleus (tokens 4, 5), which renormalisation divides out
    behaviour_logits = THETA + SMALL + torch.tensor([0, 0, 0, 0, 0.3, 0.9], dtype=torch.float64)
    assert torch.equal(torch.isfinite(warped(THETA)), torch.isfinite(warped(behaviour_logits)))
    exact = on_policy_gradient(THETA)
    # the ratio of the unfiltered (temperature-only) distributions: renormalisation ignored
    raw = torch.log_softmax(THETA / TAU, -1) - torch.log_softmax(behaviour_logits / TAU, -1)
    mu = warped(behaviour_logits).exp()
    rows = score_rows(THETA)
    kept = mu > 0
    biased = (mu[kept].unsqueeze(1) * (raw.exp()[kept] * REWARD[kept]).unsqueeze(1) * rows[kept]).sum(0)
    mass = torch.softmax(THETA / TAU, -1)[kept].sum() / torch.softmax(behaviour_logits / TAU, -1)[kept].sum()
    torch.testing.assert_close(biased, mass * exact, rtol=0, atol=ATOL)
    assert abs(mass.item() - 1) > 0.03


def test_tokens_outside_the_behaviour_nucleus_are_the_missing_share():
    behaviour_logits = THETA + SWAP
    logp, behaviour = warped(THETA), warped(behaviour_logits)
    missing = torch.isfinite(logp) & ~torch.isfinite(behaviour)
    assert missing.tolist() == [False, False, True, False, False, False]
    exact = on_policy_gradient(THETA)
    expected, _ = expected_estimate(THETA, behaviour_logits, cap=1e6)
    share = (logp.exp()[missing].unsqueeze(1) * REWARD[missing].unsqueeze(1) * score_rows(THETA)[missing]).sum(0)
    torch.testing.assert_close(expected, exact - share, rtol=0, atol=ATOL)
    assert share.abs().max() > 0.01


def test_tokens_the_current_warpers_filter_out_get_weight_zero():
    # μ's nucleus holds token 4, π's does not: a sample of it contributes nothing (π' = 0) and no NaN
    behaviour_logits = THETA + torch.tensor([0.0, 0.0, 0.0, -1.0, 1.2, 0.0], dtype=torch.float64)
    logp, behaviour = warped(THETA), warped(behaviour_logits)
    assert torch.isfinite(behaviour[4]) and torch.isneginf(logp[4])
    expected, weights = expected_estimate(THETA, behaviour_logits, cap=1e6)
    assert weights[4] == 0 and torch.isfinite(expected).all()
    tokens = torch.tensor([4, 0, 1])
    _, stats = off_policy_weights(logp[tokens].unsqueeze(0), behaviour[tokens].unsqueeze(0), 2.0)
    assert stats["filtered"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("cap", [0.9, 1.05, 1.2])
def test_truncation_removes_exactly_the_excess_over_the_cap(cap):
    behaviour_logits = THETA + SMALL
    logp, behaviour = warped(THETA), warped(behaviour_logits)
    kept = torch.isfinite(behaviour)
    ratio = torch.where(kept, (logp - behaviour).exp(), 0.0)
    exact = on_policy_gradient(THETA)
    expected, weights = expected_estimate(THETA, behaviour_logits, cap=cap)
    assert (weights[kept] <= cap).all() and (ratio > cap).any()
    rows = score_rows(THETA)
    excess = (behaviour.exp()[kept] * (ratio[kept] - cap).clamp(min=0) * REWARD[kept]).unsqueeze(1) * rows[kept]
    bias = expected - exact
    torch.testing.assert_close(bias, -excess.sum(0), rtol=0, atol=ATOL)
    # |bias| ≤ E_μ[(ρ − C)_+] · max_y |A(y) ∇log π'(y)|
    bound = (behaviour.exp()[kept] * (ratio[kept] - cap).clamp(min=0)).sum() * (
        REWARD[kept].unsqueeze(1) * rows[kept]
    ).abs().max()
    assert bias.abs().max() <= bound + ATOL


def test_truncation_bias_shrinks_with_the_cap_and_vanishes_above_the_largest_ratio():
    behaviour_logits = THETA + SMALL
    exact = on_policy_gradient(THETA)
    ratio = (warped(THETA) - warped(behaviour_logits)).exp().nan_to_num(0.0)
    biases = [
        (expected_estimate(THETA, behaviour_logits, cap)[0] - exact).abs().max().item()
        for cap in (0.9, 1.0, 1.1, ratio.max().item())
    ]
    assert biases == sorted(biases, reverse=True) and biases[0] > 0.01 and biases[-1] < ATOL


# ---------------------------------------------------------------------- sequences (toy.py)
SEQ_REWARD = torch.linspace(-1.0, 1.5, len(SEQUENCES), dtype=torch.float64) ** 3


def sequence_gradient(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.clone().requires_grad_(True)
    probs = token_logprobs(logits, SEQUENCES).sum(-1).exp()
    return torch.autograd.grad((probs * SEQ_REWARD).sum(), logits)[0]


def token_level_expectation(logits, behaviour_logits, level="token"):
    """E_μ[Σ_t w_t A ∇log π(y_t|s_t)] with w_t the token ratios (or their product, `level="sequence"`)."""
    logits = logits.clone().requires_grad_(True)
    logp = token_logprobs(logits, SEQUENCES)
    behaviour = token_logprobs(behaviour_logits, SEQUENCES)
    weights, _ = off_policy_weights(logp, behaviour, cap=1e6)
    if level == "sequence":
        weights = weights.prod(-1, keepdim=True).expand_as(weights)
    mu = behaviour.sum(-1).exp()
    surrogate = (mu.unsqueeze(1) * weights * SEQ_REWARD.unsqueeze(1) * logp).sum()
    return torch.autograd.grad(surrogate, logits)[0]


def hybrid_expectation(logits, behaviour_logits):
    """Σ_t E_{s_t ~ μ} Σ_y π(y|s_t) ∇log π(y|s_t) Q^μ(s_t, y): π's token, μ's prefix and continuation,
    computed from the tree (prefix probabilities and continuation values), not from the weights."""
    logits = logits.clone().requires_grad_(True)
    pi = torch.softmax(logits, -1)
    index = prefix_index(SEQUENCES)  # [N, T]
    behaviour_seq = token_logprobs(behaviour_logits, SEQUENCES).exp()  # μ(y_t | s_t)  [N, T]
    total = 0.0
    for t in range(SEQUENCES.shape[1]):
        prefix = behaviour_seq[:, :t].prod(-1)  # μ(s_t)
        continuation = behaviour_seq[:, t + 1 :].prod(-1)  # μ(y_>t | s_t, y_t)
        # Q^μ(s_t, y_t) = Σ over continuations; each sequence is one (s_t, y_t, continuation) path
        token = pi[index[:, t], SEQUENCES[:, t]]
        total = total + (prefix * token.detach() * continuation * SEQ_REWARD * token.log()).sum()
    return torch.autograd.grad(total, logits)[0]


def test_token_weights_correct_each_token_but_keep_the_behaviour_prefixes_and_continuations():
    logits = random_logits(0).double()
    behaviour_logits = logits + 0.3 * random_logits(1).double()
    exact = sequence_gradient(logits)
    token = token_level_expectation(logits, behaviour_logits)
    torch.testing.assert_close(token, hybrid_expectation(logits, behaviour_logits), rtol=0, atol=1e-12)
    assert (token - exact).abs().max() > 1e-3  # token-level weights are not the sequence ratio
    # the product of the ratios (the sequence ratio) is unbiased; with μ = π the weights are 1
    torch.testing.assert_close(
        token_level_expectation(logits, behaviour_logits, "sequence"), exact, rtol=0, atol=1e-12
    )
    torch.testing.assert_close(token_level_expectation(logits, logits), exact, rtol=0, atol=1e-12)


def test_token_level_bias_is_first_order_in_the_lag():
    logits = random_logits(2).double()
    direction = random_logits(3).double()
    exact = sequence_gradient(logits)

    def bias(scale: float) -> float:
        return (token_level_expectation(logits, logits + scale * direction) - exact).norm().item()

    ratio = bias(0.02) / bias(0.01)
    assert 1.8 < ratio < 2.2, ratio
