"""Gaussian ELBO pieces for latent thought vectors against closed forms, torch.distributions and quadrature.

Toy for the bound: one scalar latent z ~ N(0, 1) and sequences x of length 3 over 3 tokens (27 of
them, listed) with p(x|z) = Π_t softmax(a_t + z b_t)[x_t]. log p(x) = log ∫ p(x|z) N(z; 0, 1) dz and
every expectation under q = N(μ, σ²) are computed by Gauss–Hermite quadrature (exact to ~1e-12 for
these smooth integrands), so the ELBO identity and the bound can be checked without sampling.
Everything is in float64.
"""

import math

import numpy as np
import pytest
import torch
from toy import SEQUENCES

from reasoning.objectives.latent import (
    gaussian_kl_standard_normal,
    nelbo,
    perplexity_upper_bound,
    reconstruction_nll,
    reparameterize,
)


def random_gaussian(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=generator, dtype=torch.float64)
    logvar = 1.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
    return mu, logvar


def test_kl_matches_torch_distributions_per_sequence():
    mu, logvar = random_gaussian((5, 2, 3, 4), seed=0)
    q = torch.distributions.Independent(torch.distributions.Normal(mu, (0.5 * logvar).exp()), 3)
    p = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu)), 3
    )
    expected = torch.distributions.kl_divergence(q, p)
    kl = gaussian_kl_standard_normal(mu, logvar)
    assert kl.shape == (5,)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)


def test_kl_is_zero_at_the_prior_and_has_the_closed_form_gradient():
    zeros = torch.zeros(3, 7, dtype=torch.float64)
    assert torch.equal(gaussian_kl_standard_normal(zeros, zeros), torch.zeros(3, dtype=torch.float64))
    mu, logvar = random_gaussian((3, 7), seed=1)
    mu.requires_grad_()
    logvar.requires_grad_()
    grad_mu, grad_logvar = torch.autograd.grad(gaussian_kl_standard_normal(mu, logvar).sum(), [mu, logvar])
    torch.testing.assert_close(grad_mu, mu.detach())  # ∂KL/∂μ = μ
    torch.testing.assert_close(grad_logvar, 0.5 * (logvar.detach().exp() - 1))  # ∂KL/∂log σ² = ½(σ² − 1)


def test_kl_matches_monte_carlo_log_density_ratio():
    """KL(q ‖ p) = E_q[log q(z) − log p(z)]: the sample mean lies within 4 standard errors."""
    mu, logvar = random_gaussian((2, 6), seed=2)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.manual_seed(3)
    z = q.sample((200_000,))  # [S, 2, 6]
    ratio = (q.log_prob(z) - p.log_prob(z)).sum(-1)  # [S, 2]
    mean, stderr = ratio.mean(0), ratio.std(0) / math.sqrt(ratio.shape[0])
    kl = gaussian_kl_standard_normal(mu, logvar)
    assert torch.all((mean - kl).abs() < 4 * stderr), (mean, kl, stderr)


def test_reparameterize_is_mu_plus_sigma_noise_with_the_right_moments():
    mu, logvar = random_gaussian((4,), seed=4)
    noise = torch.randn(100_000, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z = reparameterize(mu, logvar, noise)
    torch.testing.assert_close(z, mu + (0.5 * logvar).exp() * noise)
    sigma = (0.5 * logvar).exp()
    stderr = sigma / math.sqrt(noise.shape[0])
    assert torch.all((z.mean(0) - mu).abs() < 4 * stderr)
    assert torch.all((z.var(0) / sigma**2 - 1).abs() < 4 * math.sqrt(2 / noise.shape[0]))
    mu.requires_grad_()
    logvar.requires_grad_()
    grad_mu, grad_logvar = torch.autograd.grad(reparameterize(mu, logvar, noise[0]).sum(), [mu, logvar])
    torch.testing.assert_close(grad_mu, torch.ones_like(mu))
    torch.testing.assert_close(grad_logvar, 0.5 * sigma * noise[0])


def test_reconstruction_nll_sums_scored_tokens_and_ignores_masked_minus_inf():
    logp = torch.tensor([[-0.5, -1.0, -float("inf")], [-2.0, -0.25, -0.75]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(reconstruction_nll(logp, mask), torch.tensor([1.5, 1.0], dtype=torch.float64))


# ------------------------------------------------------------------------------ one-latent toy

NODES, WEIGHTS = np.polynomial.hermite_e.hermegauss(120)  # ∫ f(u) e^{−u²/2} du ≈ Σ w_i f(u_i)
NODES = torch.tensor(NODES)
LOG_WEIGHTS = torch.tensor(np.log(WEIGHTS)) - 0.5 * math.log(2 * math.pi)  # E_{N(0,1)}[f] = Σ e^{lw} f


def toy_decoder(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 3, generator=generator, dtype=torch.float64)  # [position, token]
    b = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    return a, b


def toy_token_logprobs(z: torch.Tensor, x: torch.Tensor, decoder) -> torch.Tensor:
    """log p(x_t|z) for z `[...]` and one sequence x `[3]` -> `[..., 3]`."""
    a, b = decoder
    logits = a + z[..., None, None] * b  # [..., 3, 3]
    return torch.log_softmax(logits, dim=-1).gather(-1, x.expand(*z.shape, 3)[..., None]).squeeze(-1)


def log_evidence(x, decoder):
    """log p(x) = log E_{N(0,1)}[p(x|z)] by quadrature."""
    return torch.logsumexp(LOG_WEIGHTS + toy_token_logprobs(NODES, x, decoder).sum(-1), dim=0)


def expected_under_q(f, mu, logvar):
    """E_{N(μ, σ²)}[f(z)] by quadrature (z = μ + σ u, u ~ N(0, 1))."""
    z = mu + math.exp(0.5 * logvar) * NODES
    return (LOG_WEIGHTS.exp() * f(z)).sum()


def test_quadrature_evidence_normalises_over_all_sequences():
    decoder = toy_decoder()
    total = torch.logsumexp(torch.stack([log_evidence(x, decoder) for x in SEQUENCES]), dim=0)
    assert abs(total.item()) < 1e-10


def nelbo_and_kl_to_posterior(x, decoder, mu: float, logvar: float):
    """(E_q[NELBO], KL(q ‖ p(z|x))) for q = N(μ, e^{logvar}), both by quadrature."""
    evidence = log_evidence(x, decoder)
    mu_t, logvar_t = torch.tensor([mu], dtype=torch.float64), torch.tensor([logvar], dtype=torch.float64)

    def nelbo_at(z):
        logp = toy_token_logprobs(z, x, decoder).reshape(-1, 3)
        return nelbo(logp, torch.ones(1, 3), mu_t.expand(z.numel()), logvar_t.expand(z.numel()))

    def log_q_minus_log_posterior(z):
        log_q = -0.5 * ((z - mu) ** 2 / math.exp(logvar) + logvar + math.log(2 * math.pi))
        log_joint = toy_token_logprobs(z, x, decoder).sum(-1) - 0.5 * z**2 - 0.5 * math.log(2 * math.pi)
        return log_q - (log_joint - evidence)

    return expected_under_q(nelbo_at, mu, logvar), expected_under_q(log_q_minus_log_posterior, mu, logvar)


@pytest.mark.parametrize("mu, logvar", [(0.0, 0.0), (0.7, -1.0), (-1.2, -3.0)])
def test_expected_nelbo_is_minus_evidence_plus_kl_to_the_true_posterior(mu, logvar):
    """E_q[NELBO] = −log p(x) + KL(q ‖ p(z|x)) ≥ −log p(x), every expectation by quadrature."""
    decoder = toy_decoder()
    for x in SEQUENCES[[0, 5, 13, 26]]:
        evidence = log_evidence(x, decoder)
        expected_nelbo, kl_to_posterior = nelbo_and_kl_to_posterior(x, decoder, mu, logvar)
        torch.testing.assert_close(expected_nelbo, -evidence + kl_to_posterior, rtol=0, atol=1e-9)
        assert kl_to_posterior > 0 and expected_nelbo > -evidence


def test_monte_carlo_nelbo_with_reparameterised_draws_matches_quadrature():
    decoder = toy_decoder(1)
    x = SEQUENCES[17]
    mu, logvar = torch.tensor([0.4], dtype=torch.float64), torch.tensor([-0.5], dtype=torch.float64)
    noise = torch.randn(50_000, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    z = reparameterize(mu, logvar, noise)  # [S, 1]
    values = nelbo(
        toy_token_logprobs(z[:, 0], x, decoder), torch.ones(1, 3), mu.expand(z.shape), logvar.expand(z.shape)
    )
    exact, _ = nelbo_and_kl_to_posterior(x, decoder, mu.item(), logvar.item())
    stderr = values.std() / math.sqrt(values.numel())
    assert abs(values.mean() - exact) < 4 * stderr


def test_perplexity_upper_bound_is_exp_of_nelbo_per_token():
    assert perplexity_upper_bound(torch.tensor(30.0), 10) == pytest.approx(math.exp(3.0))
    assert perplexity_upper_bound(0.0, 0) == 1.0
