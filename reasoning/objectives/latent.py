"""Gaussian variational Bayes for latent thought vectors (Kong et al., 2025; `docs/methods/latent_thought.md`).

Notation: x a token sequence, z its latent thought vectors (any shape per sequence, e.g. `[L, n, d]`),
prior p(z) = N(0, I), decoder p_β(x|z), and the local posterior q(z|x) = N(μ, diag σ²) whose
parameters μ and log σ² are free tensors fitted per sequence. The evidence lower bound is

    ELBO(x) = E_q[log p_β(x|z)] − KL(q(z|x) ‖ p(z)) ≤ log p_β(x),

and the functions below return its negative (NELBO, a loss) per sequence. The expectation is
estimated with the reparameterisation z = μ + σ ε, ε ~ N(0, I), so gradients reach μ and log σ².

Conventions: the first dimension is the batch (one entry per sequence); the KL sums every other
dimension. Token log-probabilities are computed by the caller (`objectives/logprobs.py`). All
functions are pure: no I/O, no model calls.
"""

from __future__ import annotations

import math

import torch


def _sum_per_sequence(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def gaussian_kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) per sequence, `mu [B, ...]`, `logvar [B, ...]` -> `[B]`.

    Closed form, summed over every latent coordinate j of a sequence:
    KL = ½ Σ_j (μ_j² + σ_j² − log σ_j² − 1), with log σ² = `logvar`. It is zero exactly at
    μ = 0, log σ² = 0, and grows without bound as σ² → 0 (−½ log σ² per coordinate).
    """
    return 0.5 * _sum_per_sequence(mu.pow(2) + logvar.exp() - logvar - 1.0)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = μ + σ ε with σ = exp(½ log σ²), all `[B, ...]` -> `[B, ...]`.

    With ε ~ N(0, I) (`noise`, drawn by the caller so that it can be held fixed), z ~ N(μ, diag σ²)
    and z is differentiable in μ and log σ² (∂z/∂μ = 1, ∂z/∂log σ² = ½ σ ε).
    """
    return mu + torch.exp(0.5 * logvar) * noise


def reconstruction_nll(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−log p_β(x|z) per sequence, `token_logprobs [B, T]`, `mask [B, T]` -> `[B]`.

    −Σ_t m_t log p_β(x_t | x_<t, z): the sum over the scored tokens (m_t = 1) of one draw z, a
    single-sample estimate of −E_q[log p_β(x|z)]. Positions with m_t = 0 contribute 0 even where
    their log-probability is −inf.
    """
    scored = mask.bool()
    return -torch.where(scored, token_logprobs, torch.zeros_like(token_logprobs)).sum(dim=-1)


def nelbo(
    token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    kl_weight: float = 1.0,
) -> torch.Tensor:
    """Negative ELBO per sequence, `token_logprobs [B, T]`, `mask [B, T]`, `mu`/`logvar [B, ...]` -> `[B]`.

    NELBO = −Σ_t m_t log p_β(x_t | x_<t, z) + w · KL(N(μ, diag σ²) ‖ N(0, I)), with z = μ + σ ε the
    draw that produced `token_logprobs`. With w = `kl_weight` = 1 its expectation over ε is
    −ELBO ≥ −log p_β(x), so exp(Σ NELBO / Σ_t m_t) bounds the perplexity from above (in expectation);
    w ≠ 1 gives the β-VAE objective, which is no longer a bound.
    """
    return reconstruction_nll(token_logprobs, mask) + kl_weight * gaussian_kl_standard_normal(mu, logvar)


def perplexity_upper_bound(nelbo_sum: torch.Tensor | float, num_tokens: torch.Tensor | float) -> float:
    """exp(Σ_x NELBO(x) / Σ_x N_x): the ELBO bound on perplexity, ≥ exp(−Σ log p(x) / Σ N_x) in expectation."""
    return math.exp(float(nelbo_sum) / max(float(num_tokens), 1.0))


def perplexity_sequence_mean(nelbo_per_token: torch.Tensor) -> float:
    """mean_x exp(NELBO(x) / N_x) over sequences, `nelbo_per_token [B]` = NELBO(x) / N_x -> float.

    The convention of the latent thought models' reference code (per-sequence exp, then the mean).
    Each term bounds exp(−log p(x) / N_x), the sequence's own perplexity, in expectation; the mean is
    not the corpus bound `perplexity_upper_bound` (it weighs sequences alike and is ≥ exp of the mean).
    """
    return float(torch.exp(nelbo_per_token.double()).mean())
