"""KL-regularised RL as Bayesian inference / distribution matching against exact enumeration of a toy space."""

import math

import pytest
import torch
from toy import SEQUENCES, VOCAB, random_logits, sample, token_logprobs

from reasoning.objectives.bayes import (
    add_log_z_estimates,
    combine_log_means,
    configured_log_target,
    effective_sample_size,
    estimate_forward_kl,
    estimate_kl_policy_base,
    estimate_log_z,
    estimate_log_z_per_context,
    estimate_tv,
    f_pseudo_reward,
    fit_conditional_moment_lambdas,
    fit_moment_lambdas,
    fkl_pseudo_reward,
    gdcpp_baseline,
    gdcpp_coefficient,
    log_moving_average,
    log_target,
    moment_log_target,
    moving_average,
    pointwise_log_target,
    pool_log_means,
    pooled_log_z,
    pseudo_reward,
    rkl_pseudo_reward,
    self_normalized_moments,
    windowed_mean,
)

BETA = 0.5
N_SEQ = SEQUENCES.shape[0]  # 27


def seq_logp(logits):
    """log π(x) of every toy sequence, [27] (float64)."""
    return token_logprobs(logits.double(), SEQUENCES).sum(-1)


def rewards_of(sequences):
    return (sequences == 1).sum(-1).double() + 0.5 * (sequences[:, 0] == 2).double()


def constraint_of(sequences):
    """b(x) = 1 when the sequence contains a 2 (19 of 27 sequences)."""
    return (sequences == 2).any(-1)


def features_of(sequences):
    return torch.stack([(sequences == 1).sum(-1).double(), (sequences[:, 0] == 2).double()], dim=-1)


def tilted_target(seed=0):
    """(log a, log P) over the 27 sequences for a = toy(seed), P = a·exp(r/β)."""
    log_base = seq_logp(random_logits(seed))
    return log_base, log_target(log_base, rewards_of(SEQUENCES), BETA)


def sample_index(logits, n, seed):
    """Indices into SEQUENCES of n draws from the toy distribution (SEQUENCES is in lexicographic order)."""
    draws = sample(logits, n, seed)
    return (draws * torch.tensor([VOCAB**2, VOCAB, 1])).sum(-1)


def mean_and_se(values):
    return values.mean(), values.std() / len(values) ** 0.5


# ----------------------------------------------------------------------------------------- targets


def test_targets_by_hand():
    log_base, log_p = tilted_target()
    assert torch.allclose(log_p, log_base + rewards_of(SEQUENCES) / BETA)
    assert log_target(torch.tensor(-1.0), torch.tensor(2.0), 4.0) == pytest.approx(-0.5)
    b = constraint_of(SEQUENCES)
    pointwise = pointwise_log_target(log_base, b)
    assert torch.isneginf(pointwise[~b]).all() and torch.equal(pointwise[b], log_base[b])
    assert torch.equal(pointwise_log_target(log_base, b.long()), pointwise)
    lambdas = torch.tensor([0.7, -0.4], dtype=torch.float64)
    phi = features_of(SEQUENCES)
    assert torch.allclose(
        moment_log_target(log_base, phi, lambdas), log_base + 0.7 * phi[:, 0] - 0.4 * phi[:, 1]
    )


def test_configured_log_target_is_the_recipe_target():
    """The trainer's dispatch (`bayes.target`, β, the threshold of b, λ) against the formulas."""
    log_base, _ = tilted_target()
    r = rewards_of(SEQUENCES)
    phi, lambdas = features_of(SEQUENCES), torch.tensor([0.7, -0.4], dtype=torch.float64)
    common = dict(beta=BETA, threshold=1.0, features=phi, lambdas=lambdas)
    assert torch.equal(configured_log_target("tilt", log_base, r, **common), log_base + r / BETA)
    b = r >= 1.0
    assert 0 < b.sum() < N_SEQ  # the threshold keeps some sequences and drops others
    pointwise = configured_log_target("pointwise", log_base, r, **common)
    assert torch.isneginf(pointwise[~b]).all() and torch.equal(pointwise[b], log_base[b])
    tilt = log_base + phi @ lambdas
    assert torch.allclose(configured_log_target("moments", log_base, r, **common), tilt)
    both = configured_log_target("moments", log_base, r, **common, with_constraint=True)
    assert torch.isneginf(both[~b]).all() and torch.allclose(both[b], tilt[b])
    with pytest.raises(ValueError, match="moments with features"):
        configured_log_target("moments", log_base, r, beta=BETA, threshold=1.0)


# ------------------------------------------------------------------------------- partition function


def test_z_estimate_is_unbiased_and_log_z_consistent():
    _, log_p = tilted_target()
    log_z = torch.logsumexp(log_p, 0)
    proposal = random_logits(1)
    log_q = seq_logp(proposal)
    index = sample_index(proposal, 200 * 50, seed=2).view(200, 50)
    z_hat = estimate_log_z(log_p[index], log_q[index]).exp()  # 200 independent Ẑ with 50 samples each
    assert z_hat.shape == (200,)
    mean, se = mean_and_se(z_hat)
    assert abs(mean - log_z.exp()) < 4 * se
    # large N: log Ẑ within 4 (delta-method) standard errors of log Z
    index = sample_index(proposal, 200_000, seed=3)
    weights = (log_p[index] - log_q[index]).exp()
    relative_se = weights.std() / weights.mean() / len(weights) ** 0.5
    assert abs(estimate_log_z(log_p[index], log_q[index]) - log_z) < 4 * relative_se
    assert relative_se < 0.01


def test_per_context_z_for_three_contexts():
    sizes = [3000, 5000, 4000]
    log_p, log_q, index, exact = [], [], [], []
    for c, n in enumerate(sizes):
        log_base = seq_logp(random_logits(10 + c))
        target = log_target(log_base, (c + 1) / 2 * rewards_of(SEQUENCES), BETA)
        proposal = random_logits(20 + c)
        draws = sample_index(proposal, n, seed=30 + c)
        log_p.append(target[draws])
        log_q.append(seq_logp(proposal)[draws])
        index.append(torch.full((n,), c))
        exact.append(torch.logsumexp(target, 0))
    order = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(0))
    log_p, log_q, index = (torch.cat(t)[order] for t in (log_p, log_q, index))
    exact = torch.stack(exact)
    assert exact.max() - exact.min() > 0.5  # the contexts really differ
    estimate = estimate_log_z_per_context(log_p, log_q, index)
    for c in range(3):
        in_c = index == c
        # deterministic: the scattered log-mean-exp is the plain one on the context's samples
        assert torch.allclose(estimate[c], estimate_log_z(log_p[in_c], log_q[in_c]), atol=1e-12)
        weights = (log_p[in_c] - log_q[in_c]).exp()
        relative_se = weights.std() / weights.mean() / len(weights) ** 0.5
        assert abs(estimate[c] - exact[c]) < 4 * relative_se
    # grouped layout (C × K) through `estimate_log_z` agrees; an empty context gives −inf
    grouped = torch.arange(12) // 4
    values = torch.randn(12, dtype=torch.float64)
    assert torch.allclose(
        estimate_log_z_per_context(values, torch.zeros(12, dtype=torch.float64), grouped),
        estimate_log_z(values.view(3, 4), torch.zeros(3, 4, dtype=torch.float64)),
    )
    padded = estimate_log_z_per_context(values, torch.zeros_like(values), grouped, num_contexts=4)
    assert torch.isneginf(padded[3]) and torch.isfinite(padded[:3]).all()
    # a context whose samples all have P = 0 gives −inf, not nan, and leaves the others intact
    zeroed = torch.where(grouped == 1, float("-inf"), values)
    out = estimate_log_z_per_context(zeroed, torch.zeros_like(values), grouped)
    assert torch.isneginf(out[1]) and torch.allclose(out[[0, 2]], padded[[0, 2]])


def test_running_and_windowed_log_z_equal_the_pooled_estimate():
    log_w = torch.randn(100, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 - 2000
    batches = torch.split(log_w, [10, 30, 5, 40, 15])
    running, count = torch.tensor(float("nan"), dtype=torch.float64), 0  # count 0: the value is ignored
    for batch in batches:
        running, count = combine_log_means(
            running, count, estimate_log_z(batch, torch.zeros_like(batch)), len(batch)
        )
    assert count == 100
    assert torch.allclose(running, estimate_log_z(log_w, torch.zeros_like(log_w)), atol=1e-10, rtol=0)
    last = batches[-3:]
    window = pool_log_means(
        torch.stack([estimate_log_z(b, torch.zeros_like(b)) for b in last]),
        torch.tensor([len(b) for b in last], dtype=torch.float64),
    )
    pooled = torch.cat(last)
    assert torch.allclose(window, estimate_log_z(pooled, torch.zeros_like(pooled)), atol=1e-10, rtol=0)
    assert window < -1990  # far below exp underflow, still exact
    # per-context running estimates: counts per context, a context unseen so far stays −inf
    a, na = torch.tensor([0.0, 1.0, float("nan")]), torch.tensor([2.0, 3.0, 0.0])
    b, nb = torch.tensor([1.0, float("nan"), float("nan")]), torch.tensor([1.0, 0.0, 0.0])
    out, n = combine_log_means(a, na, b, nb)
    expected = torch.log(torch.tensor([(2 * 1 + 1 * math.e) / 3, math.e]))
    assert torch.allclose(out[:2], expected) and torch.isneginf(out[2]) and torch.equal(n, na + nb)


def test_running_log_z_histories_pool_the_samples_of_their_window():
    """`add_log_z_estimates` (the trainer's per-prompt Ẑ state): window 0 keeps one entry, the log Ẑ of
    every sample so far; window W the last W entries; two estimates of one key in one call are one entry."""
    log_w = torch.randn(60, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) - 50
    parts = torch.split(log_w, [10, 20, 5, 25])
    batch = [float(estimate_log_z(b, torch.zeros_like(b))) for b in parts]

    def exact(samples):
        return estimate_log_z(samples, torch.zeros_like(samples))

    everything, windowed = {}, {}
    for value, part in zip(batch, parts):
        for history, window in ((everything, 0), (windowed, 2)):
            add_log_z_estimates(history, [("a", value, float(len(part)))], window)
    assert len(everything["a"]) == 1 and everything["a"][0][1] == 60
    assert torch.allclose(pooled_log_z(everything["a"]), exact(log_w), atol=1e-12, rtol=0)
    assert [n for _, n in windowed["a"]] == [5.0, 25.0]
    assert torch.allclose(pooled_log_z(windowed["a"]), exact(torch.cat(parts[2:])), atol=1e-12, rtol=0)
    # one call with two ranks' estimates of "b" (and one of "c"): pooled into one entry each
    merged = {}
    add_log_z_estimates(merged, [("b", batch[0], 10.0), ("c", batch[2], 5.0), ("b", batch[1], 20.0)], 3)
    assert len(merged["b"]) == 1 and merged["b"][0][1] == 30.0 and merged["c"] == [(batch[2], 5.0)]
    assert torch.allclose(pooled_log_z(merged["b"]), exact(log_w[:30]), atol=1e-12, rtol=0)


def test_moving_averages():
    assert moving_average(None, 4.0, 0.25) == 4.0
    assert moving_average(2.0, 4.0, 0.25) == pytest.approx(2.5)
    old, value = torch.tensor([0.5, -3.0]), torch.tensor([2.0, 1.0])
    # `old` and `value` as logs: the log of the moving average of exp(old) and exp(value)
    expected = moving_average(old.exp(), value.exp(), 0.1).log()
    assert torch.allclose(log_moving_average(old, value, 0.1), expected)
    assert torch.equal(log_moving_average(None, value, 0.1), value)
    far = log_moving_average(old - 2000, value - 2000, 0.1)
    assert torch.allclose(far + 2000, log_moving_average(old, value, 0.1), atol=1e-3)


# ------------------------------------------------------------------------------- divergence estimates


def exact_divergences(log_p_norm, log_pi, log_base):
    p, pi = log_p_norm.exp(), log_pi.exp()
    safe = torch.where(p > 0, log_p_norm, torch.zeros_like(log_p_norm))
    kl_p_pi = (p * (safe - log_pi)).sum()
    tv = 0.5 * (p - pi).abs().sum()
    kl_pi_a = (pi * (log_pi - log_base)).sum()
    return kl_p_pi, tv, kl_pi_a


@pytest.mark.parametrize("kind", ["tilted", "pointwise"])
def test_divergence_estimates_are_exact_under_the_enumeration(kind):
    log_base, log_p = tilted_target()
    if kind == "pointwise":
        log_p = pointwise_log_target(log_base, constraint_of(SEQUENCES))
    log_z = torch.logsumexp(log_p, 0)
    log_pi = seq_logp(random_logits(2))
    # every sequence listed once: a uniform "proposal", so mean_q is the exact expectation
    log_q = torch.full((N_SEQ,), -math.log(N_SEQ), dtype=torch.float64)
    kl_p_pi, tv, kl_pi_a = exact_divergences(log_p - log_z, log_pi, log_base)
    assert kl_p_pi > 0.05 and tv > 0.05 and kl_pi_a > 0.05
    for given in (None, log_z):
        assert torch.allclose(estimate_forward_kl(log_p, log_pi, log_q, given), kl_p_pi, atol=1e-10)
        assert torch.allclose(estimate_tv(log_p, log_pi, log_q, given), tv, atol=1e-10)
    assert torch.allclose(estimate_kl_policy_base(log_pi, log_base, log_q), kl_pi_a, atol=1e-10)


def test_divergence_estimates_converge_by_monte_carlo():
    log_base, log_p = tilted_target()
    log_z = torch.logsumexp(log_p, 0)
    log_pi, proposal = seq_logp(random_logits(2)), random_logits(4)
    log_q = seq_logp(proposal)
    exact = exact_divergences(log_p - log_z, log_pi, log_base)
    index = sample_index(proposal, 40 * 2500, seed=5).view(40, 2500)
    p, pi, q, a = log_p[index], log_pi[index], log_q[index], log_base[index]
    # unbiased with the true Z: 40 independent batch estimates within 4 standard errors
    for estimate, truth in zip(
        (
            estimate_forward_kl(p, pi, q, log_z),
            estimate_tv(p, pi, q, log_z),
            estimate_kl_policy_base(pi, a, q),
        ),
        exact,
    ):
        assert estimate.shape == (40,)
        mean, se = mean_and_se(estimate)
        assert abs(mean - truth) < 4 * se
    # self-normalised (Ẑ from the same samples): consistent; the pooled estimate on all 100 000
    # samples is within 4 s.e., the s.e. taken from the spread of the 40 batch estimates
    flat = [t.reshape(-1) for t in (p, pi, q)]
    for estimator, truth in ((estimate_forward_kl, exact[0]), (estimate_tv, exact[1])):
        se = estimator(p, pi, q).std() / 40**0.5
        assert se < 0.05 and abs(estimator(*flat) - truth) < 4 * se


# ------------------------------------------------------------------------------------ pseudo-rewards


def exact_divergence(divergence, log_pi, log_p_norm):
    """D as a differentiable function of log π over the enumeration (log p normalised, constant)."""
    p, pi = log_p_norm.exp(), log_pi.exp()
    safe = torch.where(p > 0, log_p_norm, torch.zeros_like(log_p_norm))
    if divergence == "fkl":  # KL(p‖π)
        return (p * (safe - log_pi)).sum()
    if divergence == "rkl":  # KL(π‖p)
        return (pi * (log_pi - log_p_norm)).sum()
    if divergence == "js":  # KL(π‖m) + KL(p‖m), m = (π + p)/2 (Go et al.'s f)
        log_m = torch.log((pi + p) / 2)
        return (pi * (log_pi - log_m)).sum() + (p * (safe - log_m)).sum()
    if divergence == "tv":
        return 0.5 * (pi - p).abs().sum()
    raise ValueError(divergence)


CASES = [
    (divergence, target, proposal)
    for divergence in ("fkl", "rkl", "js", "tv")
    for target in ("tilted", "pointwise")
    for proposal in ("on-policy", "off-policy")
    if not (divergence == "rkl" and target == "pointwise")  # KL(π‖p) is infinite where p = 0
]


@pytest.mark.parametrize("divergence,target,proposal", CASES)
def test_pseudo_reward_gradient_equals_the_exact_divergence_gradient(divergence, target, proposal):
    log_base, log_p = tilted_target()
    if target == "pointwise":
        log_p = pointwise_log_target(log_base, constraint_of(SEQUENCES))
    log_z = torch.logsumexp(log_p, 0)
    theta = random_logits(6).double().requires_grad_(True)
    log_pi = seq_logp(theta)
    log_q = log_pi.detach() if proposal == "on-policy" else seq_logp(random_logits(7))
    if divergence == "tv":  # TV is differentiable only where π(x) ≠ p(x) for every x
        assert ((log_pi.detach() - log_p + log_z).abs() > 1e-3).all()
    (exact,) = torch.autograd.grad(
        exact_divergence(divergence, log_pi, log_p - log_z), theta, retain_graph=True
    )
    assert exact.abs().max() > 1e-3
    reward = pseudo_reward(divergence, log_p, log_z, log_pi, log_q)
    assert not reward.requires_grad and torch.isfinite(reward).all()
    # E_q[R·∇log π] = Σ_x q(x) R(x) ∇log π(x), exactly by enumeration
    (expected,) = torch.autograd.grad((log_q.exp() * reward * log_pi).sum(), theta)
    assert torch.allclose(expected, -exact, atol=1e-10, rtol=1e-8)


def test_pseudo_reward_values_by_hand():
    log_base, log_p = tilted_target()
    log_pi = seq_logp(random_logits(6))
    # on-policy reverse KL is the KL-regularised RL reward r/β − log(π/a), minus disco's constant
    # log Z + 1 (−f′(π/p) = −log(π/p) − 1)
    kl_rl = rewards_of(SEQUENCES) / BETA - (log_pi - log_base)
    assert torch.allclose(rkl_pseudo_reward(log_p, 0.0, log_pi, log_pi), kl_rl - 1.0)
    assert torch.allclose(rkl_pseudo_reward(log_p, 2.5, log_pi, log_pi), kl_rl - 3.5)
    # DPG weight p/q; at π = p JS and TV rewards vanish (f′(1) = 0)
    log_z = torch.logsumexp(log_p, 0)
    log_q = seq_logp(random_logits(7))
    assert torch.allclose(fkl_pseudo_reward(log_p, log_z, log_pi, log_q), (log_p - log_z - log_q).exp())
    for divergence in ("js", "tv"):
        assert pseudo_reward(divergence, log_p, log_z, log_p - log_z, log_q).abs().max() < 1e-12
    with pytest.raises(ValueError):
        pseudo_reward("hellinger", log_p, log_z, log_pi, log_q)


def test_gdcpp_baseline_keeps_the_gradient_and_cancels_at_the_target():
    log_base, log_p = tilted_target()
    log_z = torch.logsumexp(log_p, 0)
    theta = random_logits(6).double().requires_grad_(True)
    log_pi, log_q = seq_logp(theta), seq_logp(random_logits(7))
    unnormalised = fkl_pseudo_reward(log_p, 0.0, log_pi, log_q)  # P/q
    baseline = gdcpp_baseline(log_z, log_pi, log_q)  # Z·π/q
    assert torch.allclose(baseline, (log_z + log_pi.detach() - log_q).exp())
    assert baseline.std() > 1e-2  # not a constant: its zero-mean gradient is a real identity

    def expected_gradient(reward):
        return torch.autograd.grad((log_q.exp() * reward * log_pi).sum(), theta, retain_graph=True)[0]

    (exact,) = torch.autograd.grad(exact_divergence("fkl", log_pi, log_p - log_z), theta, retain_graph=True)
    assert torch.allclose(expected_gradient(unnormalised - baseline), -log_z.exp() * exact, atol=1e-10)
    normalised = fkl_pseudo_reward(log_p, log_z, log_pi, log_q) - gdcpp_baseline(0.0, log_pi, log_q)
    assert torch.allclose(expected_gradient(normalised), -exact, atol=1e-10)
    # at π = p the baselined reward is identically zero (zero variance)
    at_target = fkl_pseudo_reward(log_p, 0.0, log_p, log_q) - gdcpp_baseline(log_z, log_p - log_z, log_q)
    assert at_target.abs().max() < 1e-10


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "js", "tv"])
def test_gdcpp_coefficient_is_the_policy_mean_of_r_f(divergence):
    """c = Σ R / Σ π/q with every sequence drawn once from a uniform q is E_π[r_f] exactly; for fkl
    E_π[p/π] = Σ p = 1, the constant the trainer uses."""
    _, log_p = tilted_target()
    log_z = torch.logsumexp(log_p, 0)
    log_pi = seq_logp(random_logits(6))
    exact = (log_pi.exp() * f_pseudo_reward(divergence, log_p, log_z, log_pi)).sum()
    log_q = torch.full_like(log_pi, -math.log(N_SEQ))
    reward, ratio = pseudo_reward(divergence, log_p, log_z, log_pi, log_q), (log_pi - log_q).exp()
    grouped = gdcpp_coefficient(divergence, torch.stack([reward, reward]), torch.stack([ratio, ratio]))
    assert grouped.shape == (2,)
    if divergence == "fkl":
        assert torch.equal(grouped, torch.ones(2, dtype=torch.float64))
        assert abs(exact - 1) < 1e-12
    else:
        assert torch.allclose(grouped, exact.expand(2), atol=1e-12, rtol=0)


def test_windowed_mean_is_discos_window():
    """The moving-average baseline: the last `size` values and their mean (None while empty)."""
    assert windowed_mean([], [], 3) == ([], None)
    window, mean = windowed_mean([1.0, 2.0], [3.0, 4.0, 5.0], 3)
    assert window == [3.0, 4.0, 5.0] and mean == 4.0
    window, mean = windowed_mean([1.0], [2.0], 3)
    assert window == [1.0, 2.0] and mean == 1.5


# ---------------------------------------------------------------------------------- moment constraints


def test_lambda_fit_reaches_the_target_moments_exactly():
    log_base = seq_logp(random_logits(0))
    phi = features_of(SEQUENCES)
    true_lambdas = torch.tensor([0.7, -0.4], dtype=torch.float64)
    moments = torch.softmax(moment_log_target(log_base, phi, true_lambdas), 0) @ phi
    base_moments = torch.softmax(log_base, 0) @ phi
    assert (moments - base_moments).abs().max() > 0.1  # the constraint moves the distribution
    # the whole space once each (uniform proposal): self-normalised IS is exact
    lambdas = fit_moment_lambdas(phi, log_base + math.log(N_SEQ), moments)
    fitted = torch.softmax(moment_log_target(log_base, phi, lambdas), 0) @ phi
    assert (fitted - moments).abs().max() < 1e-4
    assert torch.allclose(lambdas, true_lambdas, atol=1e-4)
    # one constraint, 1-D features
    single = fit_moment_lambdas(phi[:, 0], log_base + math.log(N_SEQ), moments[0])
    assert single.dim() == 0
    exact_single = torch.softmax(log_base + single * phi[:, 0], 0) @ phi[:, 0]
    assert abs(exact_single - moments[0]) < 1e-4


def test_lambda_fit_from_samples_of_the_base():
    base = random_logits(0)
    log_base = seq_logp(base)
    phi = features_of(SEQUENCES)
    target_moments = torch.tensor([1.5, 0.2], dtype=torch.float64)
    index = sample_index(base, 20_000, seed=8)
    lambdas = fit_moment_lambdas(phi[index].float(), torch.zeros(20_000), target_moments.float())
    assert lambdas.dtype == torch.float32
    # on the samples the self-normalised moments are met to the solver tolerance
    log_w = moment_log_target(torch.zeros(20_000), phi[index].float(), lambdas)
    assert torch.allclose(
        self_normalized_moments(phi[index].float(), log_w), target_moments.float(), atol=1e-4
    )
    # and the exact moments of the fitted target are close (sampling error only)
    exact = torch.softmax(moment_log_target(log_base, phi, lambdas.double()), 0) @ phi
    assert (exact - target_moments).abs().max() < 0.03


def test_conditional_lambda_fit_meets_the_mean_moment_over_contexts_exactly():
    """Three contexts with different bases, each enumerated once (uniform q: SNIS is exact); a fourth
    with no mass is left out. The fit meets mean_c E_{p_λ(·|c)}[φ] = μ̄; one context is `fit_moment_lambdas`."""
    phi = features_of(SEQUENCES)
    bases = [seq_logp(random_logits(seed)) for seed in (0, 1, 2)]
    true_lambdas = torch.tensor([0.5, -0.3], dtype=torch.float64)

    def moments(log_base, lambdas):
        return torch.softmax(moment_log_target(log_base, phi, lambdas), 0) @ phi

    target = torch.stack([moments(b, true_lambdas) for b in bases]).mean(0)
    log_w0 = torch.cat([*(b + math.log(N_SEQ) for b in bases), torch.full((N_SEQ,), float("-inf"))])
    index = torch.arange(4).repeat_interleave(N_SEQ)
    lambdas = fit_conditional_moment_lambdas(phi.repeat(4, 1), log_w0, index, target)
    assert torch.isfinite(lambdas).all()
    fitted = torch.stack([moments(b, lambdas) for b in bases]).mean(0)
    assert (fitted - target).abs().max() < 1e-6
    assert torch.allclose(lambdas, true_lambdas, atol=1e-4)
    one = fit_conditional_moment_lambdas(
        phi, bases[0] + math.log(N_SEQ), torch.zeros(N_SEQ, dtype=torch.long), target
    )
    assert torch.allclose(one, fit_moment_lambdas(phi, bases[0] + math.log(N_SEQ), target), atol=1e-5)


# ------------------------------------------------------------------------ ESS and long sequences


def test_effective_sample_size_extremes():
    n = 64
    assert effective_sample_size(torch.full((n,), -2000.0)) == pytest.approx(n, rel=1e-5)
    one_hot = torch.full((n,), float("-inf"))
    one_hot[5] = -1500.0
    assert effective_sample_size(one_hot) == pytest.approx(1.0)
    two = torch.tensor([0.0, math.log(3.0)])  # weights 1 and 3: (1+3)²/(1+9) = 1.6
    assert effective_sample_size(two) == pytest.approx(1.6)
    batched = effective_sample_size(torch.stack([torch.zeros(n), one_hot]))
    assert torch.allclose(batched, torch.tensor([float(n), 1.0]))


def test_thousand_token_sequences_stay_finite_and_exact():
    generator = torch.Generator().manual_seed(0)
    n, length = 64, 1000
    token_q = -2.0 + 0.3 * torch.randn(n, length, generator=generator)
    log_q = token_q.sum(-1)  # ≈ −2000: exp underflows to 0 even in float64
    log_base = (token_q + 0.02 * torch.randn(n, length, generator=generator)).sum(-1)
    log_pi = (token_q + 0.02 * torch.randn(n, length, generator=generator)).sum(-1)
    reward = torch.rand(n, generator=generator)
    log_p = log_target(log_base, reward, 0.1)
    assert (log_q.double().exp() == 0).all() and (log_p < -1500).all()
    log_w = (log_p - log_q).double()
    reference = log_w.max() + torch.log(torch.exp(log_w - log_w.max()).mean())
    log_z = estimate_log_z(log_p, log_q)
    assert torch.isfinite(log_z) and abs(log_z.double() - reference) < 1e-3
    per_context = estimate_log_z_per_context(log_p, log_q, torch.arange(n) % 4)
    assert torch.isfinite(per_context).all()
    ess = effective_sample_size(log_p - log_q)
    weights = torch.exp(log_w - log_w.max())
    assert 1 <= ess <= n and abs(ess - weights.sum() ** 2 / (weights**2).sum()) < 1e-3
    for value in (
        estimate_forward_kl(log_p, log_pi, log_q),
        estimate_tv(log_p, log_pi, log_q),
        estimate_kl_policy_base(log_pi, log_base, log_q),
    ):
        assert torch.isfinite(value) and value >= -1e-3
    for divergence in ("fkl", "rkl", "js", "tv"):
        assert torch.isfinite(pseudo_reward(divergence, log_p, log_z, log_pi, log_q)).all()
    assert torch.isfinite(gdcpp_baseline(log_z, log_pi, log_q)).all()
    # shifting every log-probability by the same constant changes nothing but log Z
    shift = -500.0
    assert torch.allclose(estimate_log_z(log_p + shift, log_q), log_z + shift)
    assert torch.allclose(effective_sample_size(log_p - log_q + shift), ess)
