"""CoVRL — Coupled Variational RL (Wen et al., arXiv 2512.12576): composite prior/posterior objectives.

Notation (see `docs/methods/covrl.md`): x question, y* reference answer, z thinking trace. One set of
weights plays three roles by prompt template: prior p_φ(z|x) (question only), posterior
q_ψ(z|x, y*) (reference answer in the prompt) and decoder p_θ(y*|x, z). The composite
distribution mixes prior and posterior token by token,

    p′(z_t | z_<t) = ½ p_φ(z_t | z_<t, x) + ½ q_ψ(z_t | z_<t, x, y*),

so p′(z) = Π_t p′(z_t | z_<t) is itself an autoregressive policy whose conditional at every
prefix is the normalised mixture of the two conditionals. It is *not* the sequence-level mixture
½ p_φ(z) + ½ q_ψ(z). Trajectories are sampled by *hybrid sampling*: a whole trace comes from the
prior with probability α, otherwise from the posterior; that sampler's distribution is the
sequence-level mixture α p_φ(z) + (1 − α) q_ψ(z) (`hybrid_logprob`).

Conventions: per-token tensors are `[B, T]` over the trace tokens with an explicit mask; the two
teacher-forced passes (prior template, posterior template) score the same trace tokens, so their
per-token log-probs line up position by position. `from_prior [B]` (bool) says which template
sampled each trajectory. All functions are pure: no I/O, no model calls.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from reasoning.objectives.policy import clipped_surrogate, kl_estimate, weighted_nll
from reasoning.objectives.variational import normalized_weights


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _log_weight(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·exp(log_a) + (1 − w)·exp(log_b)), elementwise; w ∈ {0, 1} selects one side exactly."""
    _check_probability("weight", weight_a)
    if weight_a == 1.0:
        return log_a
    if weight_a == 0.0:
        return log_b
    stacked = torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)])
    return torch.logsumexp(stacked, dim=0)


def composite_logprobs(
    prior_logp: torch.Tensor, posterior_logp: torch.Tensor, prior_weight: float = 0.5
) -> torch.Tensor:
    """Per-token log-probs of the composite policy, `prior_logp [B, T]`, `posterior_logp [B, T]` -> `[B, T]`.

    log p′_t = logsumexp(log w + ℓp_t, log(1 − w) + ℓq_t); with the paper's w = ½ this is
    logsumexp(ℓp_t, ℓq_t) − log 2. ℓp_t and ℓq_t are the log-probs of the same trace token under
    the prior and the posterior template (two teacher-forced passes). `prior_weight` = w is an
    extension (the paper fixes ½). Gradients flow into both passes.
    """
    return _log_mix(prior_logp, posterior_logp, prior_weight)


def behaviour_logprobs(
    prior_logp: torch.Tensor, posterior_logp: torch.Tensor, from_prior: torch.Tensor
) -> torch.Tensor:
    """Per-token log-probs under the source that actually sampled each trace, `[B, T]` -> `[B, T]`.

    ℓ_beh,t = ℓp_t for prior-sampled rows (`from_prior[b]` True), ℓq_t for posterior-sampled rows.
    With the old policy's passes this is the behaviour log-prob of the methods file's surrogate,
    and the token-level importance denominator of the composite-KL estimator.
    """
    return torch.where(from_prior.bool().unsqueeze(-1), prior_logp, posterior_logp)


def hybrid_logprob(
    prior_seq_logp: torch.Tensor, posterior_seq_logp: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """Per-rollout hybrid-sampling log-probability, `[...]`, `[...]` -> `[...]`.

    Each trace picks its source independently (prior w.p. α, posterior otherwise) and is then
    generated whole by it, so log m(z) = log(α p_φ(z|x) + (1 − α) q_ψ(z|x, y*)), computed as a
    logsumexp. Inputs are sequence log-probs Σ_t ℓ_t (`logprobs.masked_sum(ℓ, mask, dim=-1)`).
    """
    return _log_mix(prior_seq_logp, posterior_seq_logp, alpha)


def hybrid_group_logprob(
    prior_seq_logp: torch.Tensor, posterior_seq_logp: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """Per-group hybrid-sampling log-probability of a whole group, `[..., G]`, `[..., G]` -> `[...]`.

    One source is drawn per prompt group and generates all G traces, so the group's probability
    is log(α Π_g p_φ(z_g|x) + (1 − α) Π_g q_ψ(z_g|x, y*)). For a single trace of such a group the
    marginal is again `hybrid_logprob`.
    """
    return _log_mix(prior_seq_logp.sum(dim=-1), posterior_seq_logp.sum(dim=-1), alpha)


def sample_sources(
    num_groups: int,
    group_size: int,
    alpha: float = 0.5,
    level: str = "rollout",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Which template samples each rollout, `-> bool [num_groups × group_size]` (True = prior), group by group.

    `level="rollout"` (the methods file's default): an independent Bernoulli(α) per rollout;
    `level="group"`: one Bernoulli(α) per prompt group, shared by its `group_size` rollouts.
    """
    _check_probability("alpha", alpha)
    if level == "rollout":
        return torch.rand(num_groups * group_size, generator=generator) < alpha
    if level == "group":
        return (torch.rand(num_groups, generator=generator) < alpha).repeat_interleave(group_size)
    raise ValueError(f"level must be rollout or group, got {level!r}")


def composite_clipped_surrogate(
    composite_logp: torch.Tensor,
    old_prior_logp: torch.Tensor,
    old_posterior_logp: torch.Tensor,
    from_prior: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.3,
    eps_high: float | None = None,
    ratio_to: str = "behaviour",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate on the composite policy, per token `[B, T]`, plus clip statistics.

    loss_t = −min(ρ_t Â, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â) (`policy.clipped_surrogate`), ε = 0.3,
    with `composite_logp` = log p′_θ (current passes, with gradient) and the denominator
    - `ratio_to="behaviour"` (methods file, default): ρ_t = p′_θ(z_t)/p_beh,old(z_t), the old
      prior's probability for prior-sampled rows and the old posterior's for posterior-sampled
      ones (`behaviour_logprobs`); at θ = θ_old ρ_t is the token's importance weight p′/p_beh,
      not 1;
    - `ratio_to="composite"`: ρ_t = p′_θ(z_t)/p′_old(z_t) (`composite_logprobs` of the old
      passes), the plain PPO ratio of the composite policy, 1 at θ = θ_old.
    `advantages` is [B] or [B, T]; old log-probs are detached here.
    """
    if ratio_to == "behaviour":
        old = behaviour_logprobs(old_prior_logp, old_posterior_logp, from_prior)
    elif ratio_to == "composite":
        old = composite_logprobs(old_prior_logp, old_posterior_logp)
    else:
        raise ValueError(f"ratio_to must be behaviour or composite, got {ratio_to!r}")
    return clipped_surrogate(composite_logp, old.detach(), advantages, eps_low, eps_high, mask=mask)


def composite_kl(
    composite_logp: torch.Tensor,
    prior_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor | None = None,
    weighting: str = "token",
) -> torch.Tensor:
    """Unbiased, non-negative per-token estimator of KL(p′ ‖ p_φ), `[B, T]` (three log-probs) -> `[B, T]`.

    With log ρ_t = log p′_t − log p_φ,t and the importance weight of the token's sampler s
    (prior for prior-sampled traces, posterior for posterior-sampled ones),

        k_t = W_t · (log ρ_t + 1/ρ_t − 1),   W_t = p′_t / s_t   (`weighting="token"`).

    (log ρ + 1/ρ − 1 is `kl_estimate(ℓ′, ℓp, "k3")`.) When s = p_φ, W = ρ and k_t = ρ log ρ − ρ + 1;
    when s = q_ψ, k_t = w (log ρ + 1/ρ − 1) with w = p′/q_ψ — the two estimators of the methods
    file. Both are ≥ 0, and given the prefix E_{z_t∼s}[k_t] = KL(p′(·|z_<t) ‖ p_φ(·|z_<t)), since
    E_s[W log ρ] = E_p′[log ρ] and E_s[W/ρ] = E_s[p_φ/s] = 1. Summed over a trace, the token
    weighting estimates Σ_t E_{z_<t∼s}[KL_t]: the per-token KL along the *sampler's* prefixes,
    which is not the sequence-level KL(p′ ‖ p_φ) = Σ_t E_{z_<t∼p′}[KL_t].

    `weighting="sequence"` (paper silent; an option): W_t = Π_{u≤t} p′_u/s_u over unmasked
    positions, the importance weight of the whole prefix, so that Σ_t k_t is an unbiased
    estimate of the sequence-level KL(p′ ‖ p_φ) for traces drawn from s (higher variance on long
    traces). Default "token", as in the methods file.

    `sampler_logp` is the log-prob of the token under the distribution that sampled it, normally
    `behaviour_logprobs` of the *old* passes; it is detached, so at θ = θ_old the value equals
    the methods file's formulas and the gradient of E_s[Σ_t k_t] is the gradient of the KL being
    estimated (the sampler does not move with θ). Masked positions (padding; whole truncated
    samples, which the methods file skips) give 0; reduce with `policy.aggregate_loss`.
    """
    if mask is None:
        mask = torch.ones_like(composite_logp)
    keep = mask.bool()
    zeros = torch.zeros_like(composite_logp)
    composite_logp = torch.where(keep, composite_logp, zeros)  # padding may hold anything, even −inf
    prior_logp = torch.where(keep, prior_logp, zeros)
    log_w = torch.where(keep, composite_logp - sampler_logp.detach(), zeros)
    if weighting == "sequence":
        log_w = torch.cumsum(log_w, dim=-1)
    elif weighting != "token":
        raise ValueError(f"weighting must be token or sequence, got {weighting!r}")
    per_token = torch.exp(log_w) * kl_estimate(composite_logp, prior_logp, "k3")
    return torch.where(keep, per_token, torch.zeros_like(per_token))


def kl_prior_sampled(composite_logp: torch.Tensor, prior_logp: torch.Tensor) -> torch.Tensor:
    """Methods-file estimator for prior-sampled tokens, `[B, T]` -> `[B, T]`: ρ log ρ − ρ + 1, ρ = p′/p_φ.

    Equal in value to `composite_kl` with the prior as sampler; here both ρ factors carry
    gradient (`composite_kl`, whose sampler weight is detached, gives the KL's exact gradient).
    """
    log_rho = composite_logp - prior_logp
    rho = torch.exp(log_rho)
    return rho * log_rho - rho + 1


def kl_posterior_sampled(
    composite_logp: torch.Tensor, prior_logp: torch.Tensor, posterior_logp: torch.Tensor
) -> torch.Tensor:
    """Methods-file estimator for posterior-sampled tokens, `[B, T]` -> `[B, T]`: w (log ρ + 1/ρ − 1).

    ρ = p′/p_φ, w = p′/q_ψ. Equal in value to `composite_kl` with the posterior as sampler.
    """
    w = torch.exp(composite_logp - posterior_logp)
    return w * kl_estimate(composite_logp, prior_logp, "k3")


def nll_selection(
    from_prior: torch.Tensor, well_formed: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """Which trajectories enter the selective NLL, `[B]` each -> bool `[B]`.

    Prior-sampled, well-formatted and Â > 0 (methods file, loss term 3).
    """
    return from_prior.bool() & well_formed.bool() & (advantages > 0)


def selective_nll(
    prior_logp: torch.Tensor, mask: torch.Tensor, selected: torch.Tensor, coef: float = 0.1
) -> torch.Tensor:
    """Selective NLL term, `prior_logp [B, T]`, `mask [B, T]`, `selected [B]` -> scalar.

    coef · (−(1/B) Σ_i 1[selected_i] · mean_t ℓp_it) (`policy.weighted_nll`): SFT of the prior
    template on its own good samples (`nll_selection`). The paper leaves the coefficient and the
    reduction open; chosen here: per-token mean within a trace, mean over the whole batch (rows not
    selected count in B, so the term shrinks when few samples qualify), `coef` = 0.1 so the term
    stays small next to the surrogate, whose per-token scale is |Â| ≈ 1. Unselected rows
    contribute 0 even where ℓp is −inf.
    """
    selected = selected.bool()
    safe = torch.where(selected.unsqueeze(-1), prior_logp, torch.zeros_like(prior_logp))
    return coef * weighted_nll(safe, mask, selected.to(prior_logp.dtype))


def decoder_weights(
    reward: str,
    rewards: torch.Tensor,
    answer_logp: torch.Tensor,
    answer_mask: torch.Tensor,
    truncated: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """Per-sample weights w_i of the decoder term −w_i log p(y*|x, z_i), `[N]` (0 for truncated samples
    and for samples without a reward, NaN: e.g. an excluded missing marker).

    `verifree`: w = R, since ∇E[p(y*|x, z)] = E[p ∇log p]; `jepo`: w = G ρ̃_i with ρ̃ the softmax of
    log p(y*|x, z) over the group (∇ log (1/G) Σ_i p_i = Σ_i ρ̃_i ∇ log p_i); otherwise 1 (the ELBO's
    decoder gradient E[∇ log p(y*|x, z)]). `answer_logp`, `answer_mask` `[N, A]`, rows group by group.
    """
    off = truncated.bool() | torch.isnan(rewards)
    if reward == "verifree":
        weights = torch.nan_to_num(rewards, nan=0.0)
    elif reward == "jepo":
        log_likelihood = (answer_logp * answer_mask.to(answer_logp.dtype)).sum(dim=-1)
        log_likelihood = torch.where(off, torch.full_like(log_likelihood, -math.inf), log_likelihood)
        grouped = log_likelihood.view(-1, group_size)
        weights = torch.nan_to_num(normalized_weights(grouped) * group_size, nan=0.0).reshape(-1)
    else:
        weights = torch.ones_like(rewards)
    return torch.where(off, torch.zeros_like(weights), weights)


class CompositeTerms(NamedTuple):
    """`composite_policy_terms`' output: per-token `[B, T]` tensors and the clip statistics."""

    composite: torch.Tensor  # log p′_θ
    behaviour: torch.Tensor  # log p_beh,old (the sampler's old log-prob)
    surrogate: torch.Tensor  # clipped surrogate loss per token
    kl: torch.Tensor  # KL(p′ ‖ p_φ) estimator per token (0 when w = 1 or not asked for)
    ratio: torch.Tensor  # the surrogate's ratio p′_θ / denominator (detached)
    clip_stats: dict[str, torch.Tensor]


def composite_policy_terms(
    prior: torch.Tensor,
    posterior: torch.Tensor,
    old_prior: torch.Tensor,
    old_posterior: torch.Tensor,
    from_prior: torch.Tensor,
    advantages: torch.Tensor,
    policy_mask: torch.Tensor,
    kl_mask: torch.Tensor,
    weight: float = 0.5,
    ratio_to: str = "behaviour",
    eps_low: float = 0.3,
    eps_high: float | None = None,
    kl_weighting: str = "token",
    with_kl: bool = True,
) -> CompositeTerms:
    """The per-token terms of CoVRL's policy loss from the prior and posterior passes `[B, T]` (current,
    with gradient, and old), `from_prior [B]`, `advantages [B]`, masks `[B, T]`.

    log p′ = `composite_logprobs(prior, posterior, weight)`; the surrogate is
    `composite_clipped_surrogate` (ratio to the sampler's old log-prob, or to the old composite with
    w = ½), or for w ≠ ½ with `ratio_to="composite"` the plain PPO ratio p′_θ/p′_old; the KL term is
    `composite_kl(p′, p_φ, p_beh,old)` on `kl_mask` (identically 0 when w = 1: p′ = p_φ).
    """
    composite = composite_logprobs(prior, posterior, weight)
    behaviour = behaviour_logprobs(old_prior, old_posterior, from_prior)
    eps = dict(eps_low=eps_low, eps_high=eps_high, mask=policy_mask)
    if ratio_to == "behaviour" or weight == 0.5:
        surrogate, stats = composite_clipped_surrogate(
            composite, old_prior, old_posterior, from_prior, advantages, ratio_to=ratio_to, **eps
        )
        denominator = behaviour if ratio_to == "behaviour" else composite_logprobs(old_prior, old_posterior)
    else:  # the plain PPO ratio of p′ with w ≠ ½
        denominator = composite_logprobs(old_prior, old_posterior, weight)
        surrogate, stats = clipped_surrogate(composite, denominator.detach(), advantages, **eps)
    if weight < 1.0 and with_kl:
        kl = composite_kl(composite, prior, behaviour, mask=kl_mask, weighting=kl_weighting)
    else:
        kl = torch.zeros_like(composite)
    ratio = torch.exp(composite.detach() - denominator.detach())
    return CompositeTerms(composite, behaviour, surrogate, kl, ratio, stats)
