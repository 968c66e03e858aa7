"""Variational-reasoning objectives against exact enumeration of a toy latent-trace model.

Toy (on toy.py's space of 27 sequences of length 3 over 3 tokens): the first two tokens are the
thinking trace z (9 traces, index 3·z₁ + z₂), the last token is the answer y, and the correct
set is Y = {0}. The prior π_θ is toy.py's autoregressive policy with logits θ; the posterior
q_φ(z|x, y′) is the same policy with other logits φ, read on the trace tokens only (its answer
position is ignored), so it is a distribution over the 9 traces that does not depend on θ.
Everything is in float64 so that identities hold to 1e-6 and better.
"""

import itertools
import math

import pytest
import torch
from toy import SEQUENCES, random_logits, token_logprobs

from reasoning.objectives.variational import (
    effective_sample_size,
    elbo,
    forward_kl_posterior_weights,
    iwae_bound,
    iwae_curve,
    iwae_surrogate,
    log_acc_estimator,
    log_gml_estimator,
    log_likelihood_estimator,
    normalized_weights,
    practical_log_weights,
    practical_weights,
    weighted_posterior_nll,
)

CORRECT = [0]  # the answer set Y
NUM_TRACES = 9


def trace_tables(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(z|x) [9], log π(Y|x, z) [9]) for the policy with these logits."""
    logp = token_logprobs(logits, SEQUENCES).view(NUM_TRACES, 3, 3)  # [z, y, position]
    log_trace = logp[:, 0, :2].sum(-1)
    log_answer = torch.logsumexp(logp[:, CORRECT, 2], dim=-1)
    return log_trace, log_answer


def toy(seed: int = 0, mismatch: float = 0.7):
    """θ, φ and the exact quantities: log p(z, Y|x), log q(z), log P(Y|x), log P(z|x, Y)."""
    theta = random_logits(seed).double()
    phi = theta + mismatch * random_logits(100 + seed).double()
    log_prior, log_lik = trace_tables(theta)
    log_q, _ = trace_tables(phi)
    log_joint = log_prior + log_lik
    log_evidence = torch.logsumexp(log_joint, dim=0)
    return theta, phi, log_joint, log_q, log_evidence, log_joint - log_evidence


def draw(log_probs: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    flat = torch.multinomial(log_probs.exp(), math.prod(shape), replacement=True, generator=generator)
    return flat.view(shape)


def multisets(k: int, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every multiset of K traces as sorted index tuples [N, K], and its probability under q^{⊗K} [N]."""
    index = torch.tensor(list(itertools.combinations_with_replacement(range(NUM_TRACES), k)))
    counts = torch.nn.functional.one_hot(index, NUM_TRACES).sum(1).double()
    log_prob = math.lgamma(k + 1) - torch.lgamma(counts + 1).sum(-1) + (counts * log_q).sum(-1)
    return index, log_prob.exp()


def exact_expected_bound(k: int, log_joint: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """E_{z_1..K ~ q}[L^K] by enumerating multisets (L^K depends only on the multiset)."""
    index, prob = multisets(k, log_q)
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-12)
    return (prob.detach() * iwae_bound(log_joint[index], log_q[index])).sum()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


# (1) the IWAE bound -------------------------------------------------------------------------------


def test_iwae_bound_by_hand_and_in_log_space():
    log_p = torch.tensor([[-1.0, -2.0, -3.0], [-5000.0, -5001.0, -5002.0]], dtype=torch.float64)
    log_q = torch.tensor([[-0.5, -1.0, -1.5], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    direct = torch.log(torch.exp(log_p[0] - log_q[0]).mean())
    bound = iwae_bound(log_p, log_q)
    assert bound[0].item() == pytest.approx(direct.item(), abs=1e-12)
    # far below exp's range: still finite and equal to the shifted direct computation
    assert bound[1].item() == pytest.approx(
        -4999.0 + math.log(torch.exp(-torch.arange(3.0, dtype=torch.float64)).mean()), abs=1e-9
    )
    # K = 1 is the single-sample ELBO
    assert torch.allclose(iwae_bound(log_p[:, :1], log_q[:, :1]), elbo(log_p[:, :1], log_q[:, :1]))


def test_expected_iwae_bound_increases_with_k_below_the_evidence():
    _, _, log_joint, log_q, log_evidence, _ = toy()
    exact = [exact_expected_bound(k, log_joint, log_q).item() for k in (1, 2, 4, 8)]
    assert exact[0] == pytest.approx((log_q.exp() * (log_joint - log_q)).sum().item(), abs=1e-12)
    assert all(value < log_evidence.item() for value in exact)
    assert all(later > earlier + 1e-3 for earlier, later in itertools.pairwise(exact))
    # K = 256 by Monte Carlo: within 0.01 nats of log P(Y|x) (exact gap ≈ χ²(P‖q)/2K ≈ 0.002)
    index = draw(log_q, (2000, 256), seed=1)
    samples = iwae_bound(log_joint[index], log_q[index])
    mean, se = samples.mean().item(), samples.std().item() / len(samples) ** 0.5
    assert abs(mean - log_evidence.item()) < 0.01
    assert mean < log_evidence.item() + 4 * se
    assert log_evidence.item() - mean < log_evidence.item() - exact[-1]


def test_iwae_bound_is_exact_for_every_draw_when_q_is_the_true_posterior():
    _, _, log_joint, log_q, log_evidence, log_posterior = toy()
    for k in (1, 3, 16):
        index = draw(log_posterior, (500, k), seed=k)
        bound = iwae_bound(log_joint[index], log_posterior[index])
        assert torch.allclose(bound, log_evidence.expand_as(bound), atol=1e-12)
    # with an imperfect q a single draw can lie above log P(Y|x): only the expectation is a bound
    index = draw(log_q, (500, 4), seed=2)
    assert (iwae_bound(log_joint[index], log_q[index]) > log_evidence).any()


# (2) the Eq. 6 gradient estimator -------------------------------------------------------------


def test_iwae_surrogate_gradient_is_unbiased_for_the_expected_bound():
    k = 4
    theta, phi, _, _, _, _ = toy()
    theta = theta.clone().requires_grad_(True)
    log_q = trace_tables(phi)[0]

    def log_joint_of(logits):
        log_prior, log_lik = trace_tables(logits)
        return log_prior + log_lik

    log_joint = log_joint_of(theta)
    (exact,) = torch.autograd.grad(exact_expected_bound(k, log_joint, log_q), theta)
    # the identity in expectation, exactly: Σ_tuples q(tuple) ∇S(tuple) = ∇E[L^K]
    index, prob = multisets(k, log_q)
    log_joint = log_joint_of(theta)
    (in_expectation,) = torch.autograd.grad(
        (prob * iwae_surrogate(log_joint[index], log_q[index])).sum(), theta
    )
    assert torch.allclose(in_expectation, exact, atol=1e-10)
    # Monte Carlo: 20 independent batches of 1000 K-sample draws
    estimates = []
    for seed in range(20):
        index = draw(log_q, (1000, k), seed=10 + seed)
        log_joint = log_joint_of(theta)
        (grad,) = torch.autograd.grad(iwae_surrogate(log_joint[index], log_q[index]).mean(), theta)
        estimates.append(grad)
    estimates = torch.stack(estimates)
    mean, se = estimates.mean(0), estimates.std(0) / len(estimates) ** 0.5
    assert ((mean - exact).abs() <= 4 * se + 1e-9).all()
    # the check has power: the ELBO gradient (uniform weights) is far from the IWAE gradient
    (elbo_grad,) = torch.autograd.grad((log_q.exp() * log_joint_of(theta)).sum(), theta)
    assert (elbo_grad - exact).abs().max() > 10 * (4 * se).max()


def test_iwae_surrogate_weights_are_detached_and_skip_impossible_traces():
    log_p = torch.tensor([-1.0, -2.0, float("-inf")], requires_grad=True)
    log_q = torch.tensor([-1.5, -1.0, -0.5], requires_grad=True)
    value = iwae_surrogate(log_p, log_q)
    rho = torch.softmax(torch.tensor([0.5, -1.0]), dim=0)
    assert value.item() == pytest.approx((rho * torch.tensor([-1.0, -2.0])).sum().item(), abs=1e-6)
    value.backward()
    assert torch.allclose(log_p.grad, torch.cat([rho, torch.zeros(1)]))
    assert log_q.grad is None or (log_q.grad == 0).all()


# (3) forward-KL posterior weights (Eq. 9) ------------------------------------------------------


def test_forward_kl_weights_converge_to_the_true_posterior():
    theta, _, _, _, _, log_posterior = toy()
    log_prior, log_lik = trace_tables(theta)
    distances = []
    for m in (100, 10_000, 1_000_000):
        traces = draw(log_prior, (m,), seed=m)
        weights = forward_kl_posterior_weights(log_lik[traces])
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-9)
        empirical = torch.zeros(NUM_TRACES, dtype=weights.dtype).index_add_(0, traces, weights)
        distances.append(total_variation(empirical, log_posterior.exp()))
    assert distances[-1] < 0.003
    assert distances[-1] < distances[0] / 10


def test_forward_kl_weights_with_a_verifier_that_can_say_zero():
    # Acc-style likelihood: π(Y|x, z) = 1 if z₂ = z₁ else 0, so log-likelihoods are 0 or −inf
    theta = random_logits(0).double()
    log_prior, _ = trace_tables(theta)
    z1, z2 = torch.arange(NUM_TRACES) // 3, torch.arange(NUM_TRACES) % 3
    log_lik = torch.where(z1 == z2, 0.0, float("-inf")).double()
    posterior = torch.softmax(log_prior + log_lik, dim=0)
    traces = draw(log_prior, (200_000,), seed=3)
    weights = forward_kl_posterior_weights(log_lik[traces])
    assert not weights.isnan().any() and (weights[z1[traces] != z2[traces]] == 0).all()
    empirical = torch.zeros(NUM_TRACES, dtype=weights.dtype).index_add_(0, traces, weights)
    assert total_variation(empirical, posterior) < 0.005
    # no sample verified: every weight is 0 (documented), never NaN
    none = forward_kl_posterior_weights(torch.full((2, 5), float("-inf")))
    assert (none == 0).all()


def test_weighted_posterior_nll_estimates_the_forward_kl_and_its_gradient():
    theta, phi, _, _, _, log_posterior = toy()
    log_prior, log_lik = trace_tables(theta)
    phi = phi.clone().requires_grad_(True)
    posterior = log_posterior.exp()
    cross_entropy = -(posterior * trace_tables(phi)[0]).sum()  # = KL(P ‖ q_φ) + H(P)
    (exact,) = torch.autograd.grad(cross_entropy, phi)
    traces = draw(log_prior, (1_000_000,), seed=4)
    loss = weighted_posterior_nll(forward_kl_posterior_weights(log_lik[traces]), trace_tables(phi)[0][traces])
    (estimate,) = torch.autograd.grad(loss, phi)
    assert loss.item() == pytest.approx(cross_entropy.item(), abs=5e-3)
    assert torch.allclose(estimate, exact, atol=5e-3)
    # by hand, with a zero-weight trace whose log q is −inf
    by_hand = weighted_posterior_nll(
        torch.tensor([0.25, 0.75, 0.0]), torch.tensor([-2.0, -4.0, float("-inf")])
    )
    assert by_hand.item() == pytest.approx(0.5 + 3.0)


# (4) the ELBO gap -------------------------------------------------------------------------------


def test_elbo_gap_is_the_kl_to_the_true_posterior():
    theta, _, log_joint, log_q, log_evidence, log_posterior = toy()
    q = log_q.exp()
    exact_elbo = (q * (log_joint - log_q)).sum()
    kl = (q * (log_q - log_posterior)).sum()
    assert kl.item() > 0.1  # the toy's q is a real approximation
    assert (log_evidence - exact_elbo).item() == pytest.approx(kl.item(), abs=1e-6)
    # the form in the methods note: E_q[log π(Y|x, z)] − KL(q ‖ π(z|x))
    log_prior, log_lik = trace_tables(theta)
    assert (q * log_lik).sum() - (q * (log_q - log_prior)).sum() == pytest.approx(exact_elbo.item(), abs=1e-9)
    # the Monte Carlo ELBO is unbiased for it
    index = draw(log_q, (400, 50), seed=5)
    estimates = elbo(log_joint[index], log_q[index])
    assert abs(estimates.mean() - exact_elbo) < 4 * estimates.std() / len(estimates) ** 0.5


# (5) estimators and the practical weight (Eq. 8) --------------------------------------------------


def test_gml_and_likelihood_estimators_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0, float("-inf")], [-0.5, float("nan"), 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert torch.allclose(log_gml_estimator(logp, mask), torch.tensor([-2.0, -0.5]))
    assert torch.allclose(log_likelihood_estimator(logp, mask), torch.tensor([-6.0, -0.5]))
    # batch dimensions are kept; GML is the log of the geometric mean of token probabilities
    probs = torch.tensor([[[0.9, 0.5], [0.2, 0.8]]], dtype=torch.float64)
    ones = torch.ones_like(probs)
    assert torch.allclose(log_gml_estimator(probs.log(), ones).exp(), probs.prod(-1).sqrt())
    assert torch.allclose(log_likelihood_estimator(probs.log(), ones).exp(), probs.prod(-1))


def test_accuracy_estimator_and_zero_accuracy_weight():
    log_acc = log_acc_estimator(torch.tensor([0, 3, 8]), 8)
    assert torch.isneginf(log_acc[0]) and log_acc[1].item() == pytest.approx(math.log(3 / 8))
    assert log_acc[2].item() == 0.0
    with pytest.raises(ValueError):
        log_acc_estimator(1, 0)
    with pytest.raises(ValueError):
        log_acc_estimator(5, 4)
    log_w = practical_log_weights(
        torch.tensor([-10.0, -12.0, -9.0]),
        torch.tensor([-8.0, -11.0, -9.5]),
        torch.tensor([5, 6, 4]),
        log_acc,
    )
    weights = normalized_weights(log_w)
    assert weights[0].item() == 0.0 and weights.sum().item() == pytest.approx(1.0)
    # no trace with a correct answer: all weights 0, never NaN
    none = normalized_weights(log_w.new_full((3,), float("-inf")))
    assert (none == 0).all()


def test_practical_weight_matches_the_direct_formula():
    generator = torch.Generator().manual_seed(6)
    lengths = torch.randint(3, 12, (4, 8), generator=generator)
    logp_prior = -lengths * (0.5 + torch.rand(4, 8, generator=generator, dtype=torch.float64))
    logp_post = -lengths * (0.3 + torch.rand(4, 8, generator=generator, dtype=torch.float64))
    accuracy = torch.randint(1, 9, (4, 8), generator=generator) / 8
    direct = (logp_prior.exp() / logp_post.exp()) ** (1 / lengths.double()) * accuracy
    log_w = practical_log_weights(
        logp_prior, logp_post, lengths, log_acc_estimator(accuracy * 8, 8, torch.float64)
    )
    assert torch.allclose(log_w.exp(), direct, rtol=1e-10)
    assert torch.allclose(normalized_weights(log_w), direct / direct.sum(-1, keepdim=True), rtol=1e-10)
    with pytest.raises(ValueError):
        practical_log_weights(logp_prior, logp_post, lengths - lengths, log_w)


def test_practical_weight_is_finite_for_long_traces():
    generator = torch.Generator().manual_seed(7)
    tokens_prior = -2.0 + 0.3 * torch.randn(8, 1000, generator=generator)
    tokens_post = -2.0 + 0.3 * torch.randn(8, 1000, generator=generator)
    answer = -0.5 + 0.1 * torch.randn(8, 5, generator=generator)
    log_est = log_gml_estimator(answer, torch.ones(8, 5))
    trace_prior, trace_post = tokens_prior.sum(-1), tokens_post.sum(-1)
    assert (trace_prior.exp() == 0).all()  # a direct product of probabilities underflows
    log_w = practical_log_weights(trace_prior, trace_post, torch.full((8,), 1000), log_est)
    expected = (tokens_prior.double() - tokens_post.double()).mean(-1) + answer.double().mean(-1)
    assert torch.isfinite(log_w).all()
    assert torch.allclose(log_w.double(), expected, atol=1e-4)
    weights = normalized_weights(log_w)
    assert torch.isfinite(weights).all() and weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert weights.min() > 0.01  # per-token ratios keep weights comparable across traces


def test_practical_weights_drop_filtered_traces_and_normalise_the_rest():
    generator = torch.Generator().manual_seed(8)
    lengths = torch.randint(3, 12, (3, 5), generator=generator)
    prior = -lengths * (0.5 + torch.rand(3, 5, generator=generator, dtype=torch.float64))
    post = -lengths * (0.3 + torch.rand(3, 5, generator=generator, dtype=torch.float64))
    log_est = -torch.rand(3, 5, generator=generator, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    direct = (prior.exp() / post.exp()) ** (1 / lengths.double()) * log_est.exp() * valid
    totals = direct.sum(-1, keepdim=True)
    expected = torch.where(totals > 0, direct / totals.clamp(min=1e-300), torch.zeros_like(direct))
    weights = practical_weights(prior, post, lengths, log_est, valid)
    assert torch.allclose(weights, expected, rtol=1e-10, atol=0)
    assert (weights[~valid] == 0).all() and (weights[1] == 0).all()  # no valid trace: all zeros, no NaN


# (6) statistics of the weights stage ------------------------------------------------------------


def test_iwae_curve_is_an_unbiased_estimate_of_the_expected_bound_for_each_k_prime():
    """E over K = 4 i.i.d. traces z ~ q of the curve's value at K' equals E[L^{K'}] exactly: every
    ordered 4-tuple is enumerated with its probability under q^{⊗4} (9^4 tuples)."""
    _, _, log_joint, log_q, _, _ = toy(seed=3)
    tuples = torch.tensor(list(itertools.product(range(NUM_TRACES), repeat=4)))
    prob = (log_q[tuples].sum(-1)).exp()
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-12)
    log_w = log_joint[tuples] - log_q[tuples]
    expected = {"1": 0.0, "2": 0.0, "4": 0.0}
    for p, row in zip(prob.tolist(), log_w):
        for size, value in iwae_curve([row], 4).items():
            expected[size] += p * value
    for size in (1, 2, 4):
        exact = exact_expected_bound(size, log_joint, log_q).item()
        assert expected[str(size)] == pytest.approx(exact, abs=1e-10)
    # several questions: the mean of their curves
    rows = [log_w[0], log_w[100], log_w[2000]]
    curve = iwae_curve(rows, 4)
    assert set(curve) == {"1", "2", "4"}
    for size in ("1", "2", "4"):
        assert curve[size] == pytest.approx(sum(iwae_curve([r], 4)[size] for r in rows) / 3, abs=1e-12)
    # by hand, K' = 2 on one row: blocks (w1, w2) and (w3, w4), each log((e^a + e^b)/2)
    row = torch.tensor([-1.0, -3.0, -2.0, -2.0], dtype=torch.float64)
    by_hand = (math.log((math.exp(-1) + math.exp(-3)) / 2) + math.log(math.exp(-2))) / 2
    assert iwae_curve([row], 2) == pytest.approx({"1": -2.0, "2": by_hand}, abs=1e-12)


def test_effective_sample_size_by_hand_and_at_its_bounds():
    weights = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.3, 0.2, 0.0]])
    ess = effective_sample_size(weights)
    assert ess.tolist() == pytest.approx([4.0, 1.0, 1 / (0.25 + 0.09 + 0.04)])
    generator = torch.Generator().manual_seed(9)
    random = normalized_weights(torch.randn(50, 8, generator=generator, dtype=torch.float64))
    ess = effective_sample_size(random)
    assert ((ess >= 1 - 1e-12) & (ess <= 8 + 1e-12)).all()
