"""Policy-gradient pieces of the GRPO family: advantages, clipped surrogate, aggregation, KL.

Conventions: N completions laid out group by group (N = groups × group_size); per-token
tensors are [B, T] with an explicit completion mask.
"""

from __future__ import annotations

import math

import torch

from reasoning.objectives.logprobs import masked_mean


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages `[N] -> [N]`: Â_i = (r_i − mean_group r) / s.

    s = std of the group (`scale="group"`), std of the whole batch (`"batch"`) or 1
    (`"none"`), stds with the unbiased (N−1) estimator, plus `eps`, as TRL does.
    """
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1 else 0.0
        return centred / (std + eps)
    if scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else 0.0
        return centred / (std + eps)
    raise ValueError(f"scale must be group, batch or none, got {scale!r}")


def group_reward_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unbiased (n − 1) standard deviation of each group's non-NaN rewards, `[N] -> [N / G]`.

    NaN (not applicable) entries are left out; a group with fewer than two entries gives NaN.
    """
    grouped = rewards.view(-1, group_size)
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1).to(rewards.dtype)
    values = torch.where(valid, grouped, torch.zeros_like(grouped))
    mean = values.sum(dim=1) / count.clamp(min=1)
    squares = torch.where(valid, (grouped - mean.unsqueeze(1)) ** 2, torch.zeros_like(grouped)).sum(dim=1)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    return torch.where(count >= 2, std, torch.full_like(std, math.nan))


def informative_groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups' values are not all equal, `[N] -> [N / G]` bool (DAPO's dynamic-sampling filter).

    True when a group's non-NaN values have spread (std > 0): for a 0/1 correctness metric,
    0 < accuracy < 1. A group with fewer than two non-NaN values is False. Tested as max > min,
    not std > 0, so that equal values never show a rounding-error spread.
    """
    grouped = values.view(-1, group_size)
    valid = ~torch.isnan(grouped)
    high = torch.where(valid, grouped, torch.full_like(grouped, -math.inf)).amax(dim=1)
    low = torch.where(valid, grouped, torch.full_like(grouped, math.inf)).amin(dim=1)
    return (valid.sum(dim=1) >= 2) & (high > low)


def group_baseline_advantages(
    rewards: torch.Tensor,
    group_size: int,
    baseline: str = "mean",
    scale: str = "none",
    eps: float = 1e-4,
    min_std: float = 0.0,
) -> torch.Tensor:
    """Group-relative advantages with NaN rewards left out, `[N] -> [N]` (N = groups × group_size).

    Â_i = (r_i − mean_j r_j) over the group's valid (non-NaN) entries, times n/(n − 1) for the
    leave-one-out baseline (`rloo`: r_i − mean_{j≠i} r_j), divided by the group's or the batch's
    std of valid rewards (+ eps) when `scale` says so; with `scale="group"`, groups whose std is
    below `min_std` get Â = 0 (verl's GRPO, used by the released RLPR trainer, with 1e-6). NaN
    entries (samples excluded from their group) get Â = 0 and do not move their group's baseline.
    """
    grouped = rewards.view(-1, group_size)
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1, keepdim=True).to(rewards.dtype)
    mean = torch.where(valid, grouped, torch.zeros_like(grouped)).sum(dim=1, keepdim=True) / count.clamp(
        min=1
    )
    centred = torch.where(valid, grouped - mean, torch.zeros_like(grouped))
    if baseline == "rloo":
        centred = centred * torch.where(count > 1, count / (count - 1).clamp(min=1), torch.zeros_like(count))
    elif baseline != "mean":
        raise ValueError(f"baseline must be mean or rloo, got {baseline!r}")
    if scale == "group":
        std = torch.nan_to_num(group_reward_std(rewards, group_size), nan=0.0).unsqueeze(1)
        centred = torch.where(std < min_std, torch.zeros_like(centred), centred / (std + eps))
    elif scale == "batch":
        finite = rewards[~torch.isnan(rewards)]
        centred = centred / ((finite.std() if finite.numel() > 1 else 0.0) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be none, group or batch, got {scale!r}")
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out advantages `[N] -> [N]`: r_i − mean_{j≠i} r_j = n/(n−1)·(r_i − mean r)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least two samples per group")
    grouped = rewards.view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).view(-1)


def debiased_accuracy_weights(correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-sample weights 1[correct_i] / P̂ with P̂ the group's accuracy (0 where P̂ = 0), `[N] -> [N]`.

    The accuracy-debiased forward-KL weighting (Zhou et al., Eqs. 10–12): RFT's implicit
    weight P(Y|x) per question is divided out, so every solvable question weighs the same.
    """
    grouped = correct.float().view(-1, group_size)
    accuracy = grouped.mean(dim=1, keepdim=True)
    weights = torch.where(accuracy > 0, grouped / accuracy.clamp(min=1e-12), torch.zeros_like(grouped))
    return weights.view(-1)


def debiased_accuracy_advantages(correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """Advantages (r − P̂)/P̂ = 1[correct_i]/P̂ − 1 per group, 0 in groups none solved, `[N] -> [N]`.

    The accuracy-debiased forward-KL weights (`debiased_accuracy_weights`) with the group-mean
    baseline (Zhou et al., Eqs. 10–12): each solvable question's gradient is divided by its P̂.
    """
    weights = debiased_accuracy_weights(correct, group_size).view(-1, group_size)
    solved = weights.sum(dim=1, keepdim=True) > 0
    return ((weights - 1.0) * solved).view(-1)


def debiased_format_rewards(
    correct: torch.Tensor,
    formatted: torch.Tensor,
    group_size: int,
    alpha: float = 1.0,
    beta: float = 0.1,
    gamma: float = 0.0,
) -> torch.Tensor:
    """(α−β)/P̂(Y)·1[y∈Y] + (β−γ)/P̂(fmt)·1[y∈fmt], per group `[N] -> [N]` (Zhou et al., §4).

    Rewards were α (correct), β (well formatted only), γ (else); each indicator is divided by
    its own estimated probability in the group (0 where that estimate is 0).
    """
    return (alpha - beta) * debiased_accuracy_weights(correct, group_size) + (
        beta - gamma
    ) * debiased_accuracy_weights(formatted, group_size)


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    importance_level: str = "token",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate, per token `[B, T]`, and clip statistics.

    loss_t = −min(ρ_t Â, clip(ρ_t, 1−ε_low, 1+ε_high) Â) with ρ_t = exp(log π − log π_old) per
    token, or (`importance_level="sequence"`, GSPO) one ratio per sequence
    exp(mean_t (log π − log π_old)) broadcast over its tokens. `advantages` is [B] or [B, T].
    Stats (masked means over tokens): `low` (ρ < 1−ε_low with Â < 0), `high` (ρ > 1+ε_high with
    Â > 0), `region` (either).
    """
    eps_high = eps_low if eps_high is None else eps_high
    if mask is None:
        mask = torch.ones_like(logp)
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logp - old_logp
    if importance_level == "sequence":
        log_ratio = (log_ratio * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    elif importance_level != "token":
        raise ValueError(f"importance_level must be token or sequence, got {importance_level!r}")
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    per_token = per_token.expand_as(logp)
    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (advantages < 0)).expand_as(logp).to(logp.dtype)
        high = ((ratio > 1 + eps_high) & (advantages > 0)).expand_as(logp).to(logp.dtype)
        stats = {
            "low": masked_mean(low, mask),
            "high": masked_mean(high, mask),
            "region": masked_mean(torch.maximum(low, high), mask),
        }
    return per_token, stats


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss `[B, T]` to a scalar.

    - `grpo` / `sequence_mean`: (1/B) Σ_i (Σ_t ℓ_it m_it / Σ_t m_it)
    - `bnpo` / `token_mean`: Σ ℓ m / Σ m over the micro-batch
    - `dapo`: Σ ℓ m / `normalizer` (the token count of the whole generation batch, all ranks;
      defaults to Σ m)
    - `dr_grpo`: Σ ℓ m / (B × max_completion_length), Dr. GRPO's constant normaliser.
    - `sequence_sum`: (1/B) Σ_i Σ_t ℓ_it m_it, a sum over each sequence's tokens, then a batch
      mean: REINFORCE's −Â Σ_t log π(z_t) (the released VeriFree and LaTRO trainers), which keeps
      ∇E[R] = E[R ∇log π(z)] with z the whole sequence.
    """
    mask = mask.to(per_token_loss.dtype)
    total = (per_token_loss * mask).sum()
    if loss_type in ("grpo", "sequence_mean"):
        per_sequence = (per_token_loss * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
        return per_sequence.mean()
    if loss_type in ("bnpo", "token_mean"):
        return total / mask.sum().clamp(min=1)
    if loss_type == "dapo":
        if normalizer is None:
            normalizer = mask.sum()
        return total / torch.as_tensor(normalizer, dtype=total.dtype).clamp(min=1)
    if loss_type == "sequence_sum":
        return total / per_token_loss.shape[0]
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        return total / (per_token_loss.shape[0] * max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}; use grpo, bnpo, dapo, dr_grpo or sequence_sum")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimators of KL(π ‖ π_ref) from samples of π (Schulman, 2020), `[B, T]`.

    With log r = log π_ref − log π: k1 = −log r (unbiased), k2 = ½ (log r)² (biased, low
    variance), k3 = r − 1 − log r (unbiased and ≥ 0).
    """
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"kind must be k1, k2 or k3, got {kind!r}")


def truncated_importance_weights(
    trainer_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    cap: float = 2.0,
    mask: torch.Tensor | None = None,
    masked: bool = False,
) -> torch.Tensor:
    """Correction for the engine/trainer log-prob mismatch, per token `[B, T]`, detached.

    Truncated IS: min(π_trainer/π_engine, cap). With `masked=True` (masked IS), tokens whose
    ratio exceeds `cap` get weight 0 instead. Padding positions get weight 1.
    """
    ratio = torch.exp((trainer_logp - engine_logp).detach())
    weights = torch.where(ratio > cap, torch.zeros_like(ratio), ratio) if masked else ratio.clamp(max=cap)
    if mask is not None:
        weights = torch.where(mask.bool(), weights, torch.ones_like(weights))
    return weights


def off_policy_weights(
    old_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    cap: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level truncated importance weights for rollouts of a stale policy, `[B, T]` (detached),
    and their statistics.

    w_t = min(π_old(y_t | s_t) / μ(y_t | s_t), C): μ is the behaviour policy the engine sampled with
    (weights some optimizer steps old), π_old the policy at the start of the step that trains on the
    rollouts (its weights are those of the ratio ρ_t = π_θ/π_old). Both log-probs must be those of
    the *sampling* distribution — logits / τ, restricted to the top-k / top-p nucleus and renormalised
    over it (the engine's processed log-probs; `RolloutTrainer.policy_logprobs` at its warpers):
    unrenormalised log-probs would put the ratio of the two nuclei's masses into every weight.
    E_μ[w Â ∇log π_old] is then the on-policy gradient for a single token when C ≥ max π_old/μ and
    the nucleus of π_old lies inside μ's; truncation removes E_μ[(π_old/μ − C)_+ Â ∇log π], and tokens
    of π_old's nucleus outside μ's are never sampled (their share of the gradient is missing). For a
    sequence, each token is reweighted but its prefix and continuation stay μ's (the first-order
    correction of verl / TRL's token-level TIS; tests/exact/test_off_policy.py enumerates both).

    A token the current warpers filter out (log π_old = −inf) gets w = 0; padding (mask 0) gets 1.
    Statistics (masked means over tokens): `weight_mean` (of w), `truncated` (share with
    π_old/μ > C), `filtered` (share with π_old = 0).
    """
    if not cap > 0:
        raise ValueError(f"the importance-weight cap must be > 0 (e.g. 2.0), got {cap}")
    old, behaviour = old_logp.detach(), behaviour_logp.detach()
    filtered = torch.isneginf(old)
    # −inf − (−inf) would be NaN: a token π_old cannot sample has weight 0 whatever μ gave it
    log_ratio = torch.where(filtered, torch.full_like(old, -math.inf), old - behaviour)
    ratio = torch.exp(log_ratio)
    weights = ratio.clamp(max=cap)
    if mask is None:
        mask = torch.ones_like(old)
    valid = mask.bool()
    weights = torch.where(valid, weights, torch.ones_like(weights))
    share = mask.to(weights.dtype)
    stats = {
        "weight_mean": masked_mean(weights, share),
        "truncated": masked_mean((ratio > cap).to(weights.dtype), share),
        "filtered": masked_mean(filtered.to(weights.dtype), share),
    }
    return weights, stats


def weighted_nll(logp: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """RFT / weighted SFT on samples: −(1/B) Σ_i w_i · mean_t log π(y_it), `[B, T] -> scalar`."""
    per_sequence = (logp * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return -(weights * per_sequence).sum() / logp.shape[0]


def microbatch_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    num_sequences: int | torch.Tensor,
    num_tokens: int | float | torch.Tensor | None = None,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """One micro-batch's share of a batch's loss, `[b, T] -> scalar`: summed over the micro-batches
    of any split of the batch (sizes and padding may differ), it is `aggregate_loss` of the whole.

    `num_sequences` (B) and `num_tokens` (Σ m over the batch) are the totals of the whole batch the
    loss is defined over, not of this micro-batch:
    - `grpo` / `sequence_mean`: (1/B) Σ_{i∈mb} Σ_t ℓ_it m_it / Σ_t m_it
    - `dapo` / `token_mean`: Σ_{mb} ℓ m / num_tokens
    - `dr_grpo`: Σ_{mb} ℓ m / (B × max_completion_length)
    - `sequence_sum`: (1/B) Σ_{i∈mb} Σ_t ℓ_it m_it
    `bnpo` (the micro-batch's own token mean) depends on the split itself and has no share form.
    Averaging each micro-batch's own mean instead is exact only when every micro-batch has the
    same number of sequences (grpo) or tokens (dapo).
    """
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if loss_type in ("grpo", "sequence_mean"):
        per_sequence = masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
        return per_sequence.sum() / num_sequences
    if loss_type in ("dapo", "token_mean"):
        if num_tokens is None:
            raise ValueError(f"{loss_type} needs num_tokens, the completion tokens of the whole batch")
        return masked.sum() / torch.as_tensor(num_tokens, dtype=masked.dtype).clamp(min=1)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        return masked.sum() / (num_sequences * max_completion_length)
    if loss_type == "sequence_sum":
        return masked.sum() / num_sequences
    if loss_type == "bnpo":
        raise ValueError(
            "bnpo normalises by each micro-batch's own token count, so its gradient depends on how the batch "
            "is split; use dapo (the same token normaliser over the whole batch) with token-budget micro-batches"
        )
    raise ValueError(f"unknown loss_type {loss_type!r}; use grpo, dapo, dr_grpo, sequence_mean or sequence_sum")
