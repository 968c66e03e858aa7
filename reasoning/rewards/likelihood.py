"""Reference-answer likelihood rewards: verifier-free rewards from log p(y*|x, z).

The caller cuts each sampled response after its trace z (at a token boundary, e.g. at the answer
tag), appends the reference answer y* and scores it with one teacher-forced pass: the inputs here
are the answer tokens' log-probs `answer_logp [B, T]` = log p(y*_t | x, z, y*_<t) with an explicit
`answer_mask [B, T]` (padding may hold anything, even −inf). Rows are laid out group by group
(B = groups × G) where a function works per prompt group.

Truncated traces (the response hit the length limit, so there is no complete trace to score) get a
fixed reward chosen by `truncated_reward`:
- `"none"` (default): NaN, "not applicable" in this codebase's reward tables (summed as 0 there,
  excluded from group statistics here);
- `"-inf"`: −∞ (for log-likelihood rewards: the answer is treated as never produced);
- a float: that value.
All functions are pure tensor functions: no I/O, no model calls.
"""

from __future__ import annotations

import math

import torch

from reasoning.objectives.variational import log_gml_estimator, log_likelihood_estimator

TruncatedReward = str | float


def truncated_value(truncated_reward: TruncatedReward) -> float:
    """The reward given to truncated traces: NaN for `"none"`, −∞ for `"-inf"`, else the float itself."""
    if isinstance(truncated_reward, str):
        if truncated_reward == "none":
            return math.nan
        if truncated_reward == "-inf":
            return -math.inf
        raise ValueError(f'truncated_reward must be "none", "-inf" or a number, got {truncated_reward!r}')
    if isinstance(truncated_reward, bool) or not isinstance(truncated_reward, int | float):
        raise ValueError(f'truncated_reward must be "none", "-inf" or a number, got {truncated_reward!r}')
    return float(truncated_reward)


def apply_truncation(
    reward: torch.Tensor, truncated: torch.Tensor | None, truncated_reward: TruncatedReward = "none"
) -> torch.Tensor:
    """`reward [B]`, `truncated [B]` (bool) -> `[B]`: the reward, replaced by `truncated_value` where truncated."""
    value = truncated_value(truncated_reward)
    if truncated is None:
        return reward
    return torch.where(truncated.bool(), torch.full_like(reward, value), reward)


def answer_logprob(
    answer_logp: torch.Tensor,
    answer_mask: torch.Tensor,
    reduction: str = "sum",
    truncated: torch.Tensor | None = None,
    truncated_reward: TruncatedReward = "none",
) -> torch.Tensor:
    """log p(y*|x, z), `[B, T]` -> `[B]`: Σ_t m_t ℓ_t (`"sum"`) or (1/Σ_t m_t) Σ_t m_t ℓ_t (`"mean"`).

    The sum is the CoVRL / JEPO / LaTRO reward (the exact log-likelihood of the reference answer);
    the per-token mean is the log of the geometric-mean token probability (length-robust).
    """
    if reduction == "sum":
        reward = log_likelihood_estimator(answer_logp, answer_mask)
    elif reduction == "mean":
        reward = log_gml_estimator(answer_logp, answer_mask)
    else:
        raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
    return apply_truncation(reward, truncated, truncated_reward)


def mean_token_probability(answer_logp: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """(1/Σ_t m_t) Σ_t m_t exp(ℓ_t), `[B, T]` -> `[B]`: the arithmetic-mean token probability (0 if empty)."""
    keep = answer_mask.bool()
    probs = torch.where(keep, answer_logp, torch.full_like(answer_logp, -math.inf)).exp()
    return probs.sum(dim=-1) / keep.sum(dim=-1).clamp(min=1).to(probs.dtype)


def verifree_reward(
    answer_logp: torch.Tensor,
    answer_mask: torch.Tensor,
    truncated: torch.Tensor | None = None,
    truncated_reward: TruncatedReward = "none",
) -> torch.Tensor:
    """VeriFree reward R = p(y*|x, z) = exp(Σ_t m_t ℓ_t), `[B, T]` -> `[B]` (a probability, not a log).

    The objective is E_z[p(y*|x, z)]; its gradient is E[R ∇log π(z|x)] (REINFORCE, RLOO baseline)
    plus E[R ∇log p(y*|x, z)] (`verifree_answer_nll`).
    """
    reward = log_likelihood_estimator(answer_logp, answer_mask).exp()
    return apply_truncation(reward, truncated, truncated_reward)


def verifree_answer_nll(
    answer_logp: torch.Tensor, answer_mask: torch.Tensor, rewards: torch.Tensor
) -> torch.Tensor:
    """Reward-weighted answer NLL of VeriFree, `[B, T]`, `[B]` -> scalar.

    −(1/B) Σ_i sg(R_i) Σ_t m_it ℓ_it: its gradient −(1/B) Σ_i R_i ∇log p(y*|x, z_i) is the second
    term of ∇E_z[p(y*|x, z)], since ∇p = p ∇log p. The answer log-prob is summed over tokens (not
    averaged) to keep that identity. Rewards that are not finite (NaN: not applicable, ±∞) weigh 0.
    """
    weights = rewards.detach()
    weights = torch.where(torch.isfinite(weights), weights, torch.zeros_like(weights))
    per_sequence = log_likelihood_estimator(answer_logp, answer_mask)
    safe = torch.where(weights != 0, per_sequence, torch.zeros_like(per_sequence))
    return -(weights * safe).sum() / answer_logp.shape[0]


def rlpr_reward(
    answer_logp: torch.Tensor,
    answer_mask: torch.Tensor,
    no_trace_probability: torch.Tensor | None = None,
    clip_range: tuple[float, float] | None = (0.0, 1.0),
    truncated: torch.Tensor | None = None,
    truncated_reward: TruncatedReward = "none",
) -> torch.Tensor:
    """RLPR probability reward, `[B, T]` -> `[B]`: clip(r − r_noCoT, lo, hi).

    r = (1/|y*|) Σ_t p(y*_t | x, z, y*_<t) (`mean_token_probability`), and r_noCoT `[B]` the same
    quantity with the answer scored right after the question, no trace (the caller computes it once
    per prompt and repeats it over the group); it removes the part of the reward that does not
    depend on the reasoning. `no_trace_probability=None` skips the debiasing; `clip_range=None`
    skips the clipping (default [0, 1], the methods file's clip(r − r_noCoT, 0, 1)). Truncated
    traces get `truncated_value` unclipped. Filter prompts with `rlpr_std_filter`.
    """
    reward = mean_token_probability(answer_logp, answer_mask)
    if no_trace_probability is not None:
        reward = reward - no_trace_probability.to(reward.dtype)
    if clip_range is not None:
        reward = reward.clamp(min=clip_range[0], max=clip_range[1])
    return apply_truncation(reward, truncated, truncated_reward)


def _grouped_valid(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    grouped = rewards.view(-1, group_size)
    return grouped, ~torch.isnan(grouped)


def group_reward_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unbiased (n − 1) standard deviation of each group's non-NaN rewards, `[N] -> [N / G]`.

    NaN (not applicable) entries are left out; a group with fewer than two entries gives NaN.
    """
    grouped, valid = _grouped_valid(rewards, group_size)
    count = valid.sum(dim=1).to(rewards.dtype)
    values = torch.where(valid, grouped, torch.zeros_like(grouped))
    mean = values.sum(dim=1) / count.clamp(min=1)
    squares = torch.where(valid, (grouped - mean.unsqueeze(1)) ** 2, torch.zeros_like(grouped)).sum(dim=1)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    return torch.where(count >= 2, std, torch.full_like(std, math.nan))


def rlpr_std_filter(rewards: torch.Tensor, group_size: int, threshold: float) -> torch.Tensor:
    """RLPR standard-deviation filter, `rewards [N]` -> bool `[N]`: keep groups whose reward std > threshold.

    Prompts whose G rewards hardly differ (too easy or too hard) give no stable learning signal and
    are dropped; the mask is per sample (a group's value repeated G times). The std is
    `group_reward_std` (NaN entries left out; groups with < 2 entries are dropped). RLPR adapts the
    threshold during training (`ema_threshold`).
    """
    std = group_reward_std(rewards, group_size)
    keep = ~torch.isnan(std) & (std > threshold)
    return keep.repeat_interleave(group_size)


def ema_threshold(threshold: float, group_stds: torch.Tensor, momentum: float = 0.99) -> float:
    """Exponential moving average of the filter threshold: β ← m·β + (1 − m)·mean(non-NaN group stds).

    The momentum is a choice (the methods file only says "filters prompts with low reward std");
    0.99 follows the usual EMA setting. Without any non-NaN std the threshold is unchanged.
    """
    finite = group_stds[~torch.isnan(group_stds)]
    if finite.numel() == 0:
        return float(threshold)
    return float(momentum * threshold + (1 - momentum) * finite.mean().item())


def jensen_bound(
    log_likelihood: torch.Tensor,
    truncated: torch.Tensor | None = None,
    truncated_reward: TruncatedReward = "none",
) -> torch.Tensor:
    """JEPO / JLB multi-sample bound, `log_likelihood [..., G]` -> `[...]`.

    L_G = log (1/G) Σ_g p(y*|x, z_g) = logmeanexp_g log p(y*|x, z_g) with z_1..G ∼ π(z|x), the
    IWAE bound with the prior as proposal: by Jensen E[L_G] ≤ log p(y*|x), and E[L_G] increases
    with G (a single draw can exceed log p(y*|x)). `log_likelihood` is `answer_logprob(...,
    "sum")` arranged [..., G]. Truncated traces: `"none"` leaves them out of the mean (a group with
    none left gives NaN), `"-inf"` counts them with probability 0 (the bound stays a lower bound),
    a float uses that log-likelihood. NaN entries in the input are likewise left out. For the
    supervised term, the self-normalised weights are `objectives.variational.normalized_weights`.
    """
    values = log_likelihood
    if truncated is not None:
        values = apply_truncation(values, truncated, truncated_reward)
    valid = ~torch.isnan(values)
    count = valid.sum(dim=-1)
    total = torch.logsumexp(torch.where(valid, values, torch.full_like(values, -math.inf)), dim=-1)
    bound = total - torch.log(count.clamp(min=1).to(values.dtype))
    return torch.where(count > 0, bound, torch.full_like(bound, math.nan))


def nover_log_perplexity(
    answer_logp: torch.Tensor, answer_mask: torch.Tensor, trace_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """NOVER reasoning log-perplexity, `[B, T]` -> `[B]`: −Σ_t m_t ℓ_t / (|y*| · N(|z|)).

    N(|z|) = max(1, 1 + log |z|) with |z| the trace length (`trace_lengths [B]`) damps the length
    bias; without `trace_lengths`, N = 1 (plain per-token log-perplexity). Lower is better; the
    reasoning perplexity is exp of this.
    """
    log_ppl = -log_gml_estimator(answer_logp, answer_mask)
    if trace_lengths is not None:
        lengths = torch.as_tensor(trace_lengths, device=answer_logp.device).to(log_ppl.dtype)
        log_ppl = log_ppl / torch.clamp(1 + torch.log(lengths.clamp(min=1)), min=1.0)
    return log_ppl


def group_rank_normalise(
    scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Rank of each score within its group scaled to [0, 1], higher score -> higher value, `[N] -> [N]`.

    r_i = (#{j valid: s_j < s_i} + ½ #{j ≠ i valid: s_j = s_i}) / (n_valid − 1): the best gets 1, the
    worst 0, ties share their mean rank. Depends on the scores only through their order within the
    group, so it is invariant to any strictly increasing transform. Invalid entries (and NaN scores)
    are left out and get NaN; a group with a single valid entry gives it ½.
    """
    grouped = scores.view(-1, group_size)
    ok = ~torch.isnan(grouped)
    if valid is not None:
        ok = ok & valid.bool().view(-1, group_size)
    mine, other = grouped.unsqueeze(2), grouped.unsqueeze(1)  # [n, G, 1], [n, 1, G]
    other_ok = ok.unsqueeze(1)
    not_self = ~torch.eye(group_size, dtype=torch.bool, device=scores.device)
    below = ((other < mine) & other_ok).sum(dim=2).to(scores.dtype)
    ties = ((other == mine) & other_ok & not_self).sum(dim=2).to(scores.dtype)
    count = ok.sum(dim=1, keepdim=True).to(scores.dtype)
    ranked = torch.where(
        count > 1, (below + 0.5 * ties) / (count - 1).clamp(min=1), torch.full_like(below, 0.5)
    )
    return torch.where(ok, ranked, torch.full_like(ranked, math.nan)).view(-1)


def nover_reward(
    answer_logp: torch.Tensor,
    answer_mask: torch.Tensor,
    group_size: int,
    trace_lengths: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
    truncated_reward: TruncatedReward = "none",
) -> torch.Tensor:
    """NOVER reasoning reward, `[B, T]` -> `[B]`: the group rank of −`nover_log_perplexity`, in [0, 1].

    Within each prompt group, the trace whose reasoning makes y* least perplexing gets 1, the most
    perplexing 0 (`group_rank_normalise`, ties share ranks). NOVER's format and efficiency rewards
    are separate reward functions. Truncated traces are left out of the ranking and get
    `truncated_value`.
    """
    scores = -nover_log_perplexity(answer_logp, answer_mask, trace_lengths)
    valid = None if truncated is None else ~truncated.bool()
    reward = group_rank_normalise(scores, group_size, valid)
    return apply_truncation(reward, truncated, truncated_reward)


def latro_reward(
    answer_logp: torch.Tensor,
    answer_mask: torch.Tensor,
    trace_logp: torch.Tensor,
    reference_trace_logp: torch.Tensor,
    beta: float = 0.05,
    truncated: torch.Tensor | None = None,
    truncated_reward: TruncatedReward = "none",
) -> torch.Tensor:
    """LaTRO reward, `[B, T]` and `[B]`, `[B]` -> `[B]`: log p(y*|x, z) − β (log q(z|x) − log π₀(z|x)).

    `trace_logp` = log q(z|x) is the sampling policy's sequence log-prob of the trace and
    `reference_trace_logp` = log π₀(z|x) the frozen reference's (sums over the trace tokens); the
    answer term is `answer_logprob(..., "sum")`. Used with RLOO (`policy.rloo_advantages`). β = 0.05
    is a choice (not given in the methods file).
    """
    reward = log_likelihood_estimator(answer_logp, answer_mask) - beta * (trace_logp - reference_trace_logp)
    return apply_truncation(reward, truncated, truncated_reward)
