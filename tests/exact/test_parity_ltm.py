"""Latent thought models against their reference code, re-expressed in a few lines.

Reference: the public release of Kong et al.'s code, hohooio823/Latent-LLM ("Latent-Thought-LM",
first commit 8ce9503; ghidav/Latent-Thought-Language-Models carries the same functions):
`optimizer.py` (`PosteriorOptimizer.get_fast_lr`, `_adamVI`: the fast loop) and `model.py`
(`elbo` in eval mode: the perplexity it reports).
"""

import math

import pytest
import torch

from reasoning.models.latent_inference import (
    cosine_step_size,
    elbo_perplexity,
    fit_posterior,
    scored_token_mask,
    sequence_logprobs,
)
from reasoning.models.latent_thought import build_latent_thought_model
from reasoning.objectives.latent import gaussian_kl_standard_normal, perplexity_sequence_mean, reparameterize


def reference_fast_lr(step, num_steps, lr):
    # re-expresses hohooio823/Latent-LLM/optimizer.py (PosteriorOptimizer.get_fast_lr)
    low = lr / 10
    if step < num_steps:
        return low + 0.5 * (1.0 + math.cos(math.pi * step / num_steps)) * (lr - low)
    return low


def reference_sequence_perplexity(nll, kl, length):
    # re-expresses hohooio823/Latent-LLM/model.py (elbo, eval_mode=True): exp(NELBO_b / length), batch mean
    return torch.exp((nll + kl) / length).mean()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return build_latent_thought_model(
        vocab_size=40,
        seed=3,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        latents_per_layer=2,
    ).eval()


def test_fast_lr_schedule_is_the_reference_schedule():
    for steps in (1, 4, 9, 16, 32):
        for lr in (0.3, 0.34):
            ours = [cosine_step_size(t, steps, lr, lr / 10) for t in range(steps + 2)]
            reference = [reference_fast_lr(t, steps, lr) for t in range(steps + 2)]
            assert ours == pytest.approx(reference, abs=1e-15)
            assert ours[0] == pytest.approx(lr) and ours[steps] == pytest.approx(lr / 10)
            assert steps == 1 or ours[steps - 1] > lr / 10  # the last step is still above the floor


def test_fit_posterior_is_the_reference_fast_loop(model):
    """The reference's `_adamVI`: μ = 0, log σ² = −5 + 0.1·N(0, I), one ε, AdamW (torch defaults, so
    weight decay 0.01) on Σ_b NELBO_b with `get_fast_lr`; ours with fast_weight_decay = 0.01 lands on
    the same (μ, log σ²)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (3, 12), generator=g)
    noise = torch.randn((3, *model.config.latent_shape), generator=g)
    steps, lr = 6, 0.3
    ours = fit_posterior(
        model,
        ids,
        steps=steps,
        lr=lr,
        lr_min=lr / 10,
        weight_decay=0.01,
        noise=noise,
        generator=torch.Generator().manual_seed(5),
        final_eval=False,
    )
    # re-expresses hohooio823/Latent-LLM/optimizer.py (PosteriorOptimizer._adamVI)
    mu = torch.zeros((3, *model.config.latent_shape), requires_grad=True)
    drawn = torch.randn((3, *model.config.latent_shape), generator=torch.Generator().manual_seed(5))
    log_var = (drawn * 0.1 - 5.0).requires_grad_(True)
    optimizer = torch.optim.AdamW([mu, log_var], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    mask = scored_token_mask(ids)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = reference_fast_lr(step, steps, lr)
        optimizer.zero_grad(set_to_none=True)
        z = mu + noise * torch.exp(0.5 * log_var)
        nll = -(sequence_logprobs(model, ids, None, z) * mask).sum()
        kl = (-0.5 * (1 + log_var - mu.pow(2) - log_var.exp())).flatten(1).sum(1).sum()
        (nll + kl).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)  # the reference's backward also fills the decoder's .grad
    assert torch.allclose(ours.mu, mu.detach(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours.logvar, log_var.detach(), atol=1e-5, rtol=1e-5)
    assert (mu.detach().abs().max()) > 0.1  # the loop moved
    # with the previous schedule (lr_min at the last step) the result differs: the test can fail
    moved = [cosine_step_size(t, steps, lr, lr / 10) for t in range(steps)]
    assert moved[-1] > 1.5 * lr / 10


def test_sequence_mean_perplexity_is_the_reference_convention(model):
    """Equal-length texts (the reference's fixed-length chunks): our `perplexity_sequence_mean` of
    `elbo_perplexity` is the reference's batch mean of exp(NELBO_b / length) on the same fitted q;
    `perplexity_upper_bound` is exp(Σ NELBO / Σ N), smaller by convexity."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (4, 10), generator=g)
    result = elbo_perplexity(model, ids, steps=3, batch_size=4, generator=torch.Generator().manual_seed(7))
    # the same draws as `elbo_perplexity`: ε, then the fast loop's initialisation
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn((4, *model.config.latent_shape), generator=generator)
    fit = fit_posterior(model, ids, steps=3, noise=noise, generator=generator, final_eval=False)
    with torch.no_grad():
        logp = sequence_logprobs(model, ids, None, reparameterize(fit.mu, fit.logvar, noise))
    nll = -logp.sum(-1)
    kl = gaussian_kl_standard_normal(fit.mu, fit.logvar)
    reference = reference_sequence_perplexity(nll, kl, ids.shape[1] - 1)  # length = predicted targets
    # compared in log space (nats per token): float32 sums of NELBO ~ 10² carry ~1e-6 nats of rounding
    assert math.log(result.perplexity_sequence_mean) == pytest.approx(reference.log().item(), abs=1e-5)
    ours = perplexity_sequence_mean((nll + kl) / (ids.shape[1] - 1))  # float64 here, float32 in the reference
    assert math.log(ours) == pytest.approx(reference.log().item(), abs=1e-5)
    corpus = float((nll + kl).sum()) / (4 * (ids.shape[1] - 1))
    assert math.log(result.perplexity_upper_bound) == pytest.approx(corpus, abs=1e-5)
    assert math.log(result.perplexity_sequence_mean) > math.log(result.perplexity_upper_bound) + 1e-3
