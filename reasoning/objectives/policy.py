"""Policy-gradient pieces of the GRPO family: advantages, clipped surrogate, aggregation, KL.

Conventions: N completions laid out group by group (N = groups × group_size); per-token
tensors are [B, T] with an explicit completion mask.
"""

from __future__ import annotations

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


def weighted_nll(logp: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """RFT / weighted SFT on samples: −(1/B) Σ_i w_i · mean_t log π(y_it), `[B, T] -> scalar`."""
    per_sequence = (logp * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return -(weights * per_sequence).sum() / logp.shape[0]
