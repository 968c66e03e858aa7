"""Reference-answer likelihood rewards: verifier-free rewards from log p(y*|x, z).

One rule cuts every sampled response for every reward here (`data.templates.cut_trace` with
`at="first"`): the completion is cut before its first answer marker (a token boundary), the marker
is appended to the trace and y* after it (`data.templates.answer_layout`), and one teacher-forced
pass scores y* (`models.scoring.answer_logprobs`). The inputs of the reward functions are the answer tokens' log-probs
`answer_logp [B, T]` = log p(y*_t | x, z, y*_<t) with an explicit `answer_mask [B, T]` (padding may
hold anything, even −inf). Rows are laid out group by group (B = groups × G) where a function
works per prompt group.

The answer span (`answer_layout(..., score_eos=False)`) is y* plus the template's end-of-answer
suffix; EOS is **not** scored unless `score_eos=True`, as in the released VeriFree trainer (sail-sg/VeriFree,
`verifree.py`: the span is `> \\boxed{y*} </answer>`) and the variational-reasoning GML estimate
(sail-sg/variational-reasoning, `estimate_logp_initial_reasoning_model.py`: the span ends with
`<|end_of_solution|>`). RLPR scores only y*'s own tokens and NOVER y* inside its answer tags, also
without EOS.

Two kinds of completion have no trace to score:
- **no answer marker** (`missing`): `missing_answer` says what they get — `"zero"` (default for
  the probability rewards: p(y*|x, z) = 0, so VeriFree's p, RLPR's reward and NOVER's rank reward
  are 0 and the sample stays in its group, as VeriFree's `logp_reward = −inf` does), `"exclude"`
  (NaN: not applicable, no advantage, does not move the group's baseline; the only choice for the
  log-likelihood rewards, whose value at p = 0 is −∞), or `"score"` (score y* after the whole
  completion, which is what RLPR's released code does with a format score of 0);
- **truncated** (hit the length limit): `truncated_reward` — `"none"` (NaN, excluded), `"-inf"`,
  `"score"` (keep the computed reward) or a number (VeriFree: 0, its `no_eos` samples get p = 0).
  Truncation is applied after the missing-marker rule and overrides it.
All functions are pure: no I/O, no model calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from reasoning.objectives.policy import group_reward_std
from reasoning.objectives.variational import log_gml_estimator, log_likelihood_estimator

TruncatedReward = str | float
MISSING_ANSWER = ("zero", "exclude", "score")


# ---------------------------------------------------------------------- missing and truncated
def truncated_value(truncated_reward: TruncatedReward) -> float:
    """The reward given to truncated traces: NaN for `"none"`, −∞ for `"-inf"`, else the float itself.

    `"score"` (keep the computed reward) has no fixed value: `apply_truncation` handles it.
    """
    if isinstance(truncated_reward, str):
        if truncated_reward == "none":
            return math.nan
        if truncated_reward == "-inf":
            return -math.inf
        raise ValueError(
            f'truncated_reward must be "none", "-inf", "score" or a number, got {truncated_reward!r}'
        )
    if isinstance(truncated_reward, bool) or not isinstance(truncated_reward, int | float):
        raise ValueError(
            f'truncated_reward must be "none", "-inf", "score" or a number, got {truncated_reward!r}'
        )
    return float(truncated_reward)


def apply_truncation(
    reward: torch.Tensor, truncated: torch.Tensor | None, truncated_reward: TruncatedReward = "none"
) -> torch.Tensor:
    """`reward [B]`, `truncated [B]` (bool) -> `[B]`: the reward, replaced by `truncated_value` where
    truncated (`"score"`: left as computed)."""
    if truncated_reward == "score":
        return reward
    value = truncated_value(truncated_reward)
    if truncated is None:
        return reward
    return torch.where(truncated.bool(), torch.full_like(reward, value), reward)


def apply_missing_answer(
    reward: torch.Tensor, missing: torch.Tensor | None, missing_answer: str = "zero"
) -> torch.Tensor:
    """`reward [B]`, `missing [B]` (bool: no answer marker) -> `[B]`.

    `"zero"`: 0 where missing (the answer's probability is 0); `"exclude"`: NaN (not applicable);
    `"score"`: the reward computed after the whole completion, unchanged.
    """
    if missing_answer not in MISSING_ANSWER:
        raise ValueError(f"missing_answer must be one of {', '.join(MISSING_ANSWER)}, got {missing_answer!r}")
    if missing is None or missing_answer == "score":
        return reward
    value = 0.0 if missing_answer == "zero" else math.nan
    return torch.where(missing.bool(), torch.full_like(reward, value), reward)


def _log_reward_missing(missing_answer: str) -> None:
    if missing_answer == "zero":
        raise ValueError(
            'missing_answer "zero" means p(y*|x,z) = 0, i.e. a log-likelihood reward of −inf, which '
            'has no finite advantage; use "exclude" (default) or "score" for log-likelihood rewards'
        )


def _finish(
    reward: torch.Tensor,
    missing: torch.Tensor | None,
    missing_answer: str,
    truncated: torch.Tensor | None,
    truncated_reward: TruncatedReward,
) -> torch.Tensor:
    return apply_truncation(
        apply_missing_answer(reward, missing, missing_answer), truncated, truncated_reward
    )


# ---------------------------------------------------------------------- rewards
def answer_logprob(
    answer_logp: torch.Tensor,
    answer_mask: torch.Tensor,
    reduction: str = "sum",
    truncated: torch.Tensor | None = None,
    truncated_reward: TruncatedReward = "none",
    missing: torch.Tensor | None = None,
    missing_answer: str = "exclude",
) -> torch.Tensor:
    """log p(y*|x, z), `[B, T]` -> `[B]`: Σ_t m_t ℓ_t (`"sum"`) or (1/Σ_t m_t) Σ_t m_t ℓ_t (`"mean"`).

    The sum is the CoVRL / JEPO reward (the exact log-likelihood of the reference answer); the
    per-token mean is the log of the geometric-mean token probability (length-robust). The span
    is y* and the answer suffix, EOS not scored (`answer_layout`). A log-likelihood: missing
    markers are `"exclude"`d (or `"score"`d); `"zero"` (−∞) is refused.
    """
    _log_reward_missing(missing_answer)
    if reduction == "sum":
        reward = log_likelihood_estimator(answer_logp, answer_mask)
    elif reduction == "mean":
        reward = log_gml_estimator(answer_logp, answer_mask)
    else:
        raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
    return _finish(reward, missing, missing_answer, truncated, truncated_reward)


def mean_token_probability(answer_logp: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """(1/Σ_t m_t) Σ_t m_t exp(ℓ_t), `[B, T]` -> `[B]`: the arithmetic-mean token probability (0 if empty)."""
    keep = answer_mask.bool()
    probs = torch.where(keep, answer_logp, torch.full_like(answer_logp, -math.inf)).exp()
    return probs.sum(dim=-1) / keep.sum(dim=-1).clamp(min=1).to(probs.dtype)


def verifree_reward(
    answer_logp: torch.Tensor,
    answer_mask: torch.Tensor,
    truncated: torch.Tensor | None = None,
    truncated_reward: TruncatedReward = 0.0,
    missing: torch.Tensor | None = None,
    missing_answer: str = "zero",
) -> torch.Tensor:
    """VeriFree reward R = p(y*|x, z) = exp(Σ_t m_t ℓ_t), `[B, T]` -> `[B]` (a probability, not a log).

    The objective is E_z[p(y*|x, z)]; its gradient is E[R ∇log π(z|x)] (REINFORCE over the trace
    and its answer marker, RLOO baseline) plus E[R ∇log p(y*|x, z)] (`verifree_answer_nll`). The
    span is y* and the answer suffix, EOS not scored, as in the released trainer. Defaults as
    there: no answer marker or truncated → R = 0, and the sample stays in its RLOO group.
    """
    reward = log_likelihood_estimator(answer_logp, answer_mask).exp()
    return _finish(reward, missing, missing_answer, truncated, truncated_reward)


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
    format_ok: torch.Tensor | None = None,
    format_coef: float = 0.1,
    truncated: torch.Tensor | None = None,
    truncated_reward: TruncatedReward = "score",
    missing: torch.Tensor | None = None,
    missing_answer: str = "zero",
) -> torch.Tensor:
    """RLPR reward, `[B, T]` -> `[B]`: (1 − c)·clip(r − r_noCoT, lo, hi) + c·format, c = `format_coef`.

    r = (1/|y*|) Σ_t p(y*_t | x, z, y*_<t) (`mean_token_probability` over y*'s own tokens, no EOS)
    and r_noCoT `[B]` the same with the answer scored right after the question, no trace (the
    caller computes it once per prompt and repeats it over the group); it removes the part of the
    reward that does not depend on the reasoning. `format_ok [B]` (bool) is the format check;
    without it the reward is the clipped probability term alone. The released trainer
    (OpenBMB/RLPR, `verl/workers/reward_manager/prob.py`) uses c = 0.1 and a threshold-0 shaping
    (negative differences become 0), which `clip_range` (0, 1) is (r, r_noCoT ∈ [0, 1]).
    `no_trace_probability=None` skips the debiasing; `clip_range=None` the clipping. Truncated
    samples are scored like the others by default (the released trainer keeps them; their format
    check fails); missing markers get 0 (`"score"`: RLPR's own choice, y* scored anyway).
    """
    reward = mean_token_probability(answer_logp, answer_mask)
    if no_trace_probability is not None:
        reward = reward - no_trace_probability.to(reward.dtype)
    if clip_range is not None:
        reward = reward.clamp(min=clip_range[0], max=clip_range[1])
    if format_ok is not None:
        reward = (1 - format_coef) * reward + format_coef * format_ok.to(reward.dtype)
    return _finish(reward, missing, missing_answer, truncated, truncated_reward)


def rlpr_std_filter(rewards: torch.Tensor, group_size: int, bound: float | None) -> torch.Tensor:
    """RLPR standard-deviation filter, `rewards [N]` -> bool `[N]`: keep groups whose reward std ≥ bound.

    Prompts whose G rewards hardly differ (too easy or too hard) give no stable learning signal and
    are dropped; the mask is per sample (a group's value repeated G times). The std is
    `group_reward_std` (NaN entries left out; groups with < 2 entries, NaN std, are dropped, as the
    released trainer drops NaN/inf stds). `bound=None` (the filter not started yet) keeps every
    group. The bound comes from `RLPRStdFilter`.
    """
    std = group_reward_std(rewards, group_size)
    keep = ~torch.isnan(std)
    if bound is not None:
        keep = keep & (std >= bound)
    return keep.repeat_interleave(group_size)


@dataclass
class RLPRStdFilter:
    """RLPR's adaptive std-filter bound, step by step (OpenBMB/RLPR, `verl/trainer/ppo/ray_trainer.py`,
    `filter_mode=EMA`).

    Steps count generations from 1. From `ema_start` to `filter_start − 1` nothing is filtered and
    each step's mean group std is recorded (`record`). At `filter_start` the EMA starts as the mean
    of those warm-up means; at each later step it moves by the previous step's mean std,
    ema ← m·ema + (1 − m)·std (skipped when that mean is not finite). While filtering, `bound()` is
    β·ema and groups with std ≥ bound are kept (`rlpr_std_filter`). The released scripts use
    `ema_start` 6, `filter_start` 11, m = 0.99 and β = 0.5 (Qwen), 0.9 (Llama), 1.0 (Gemma).
    """

    beta: float = 0.5
    momentum: float = 0.99
    ema_start: int = 6
    filter_start: int = 11
    step: int = 0
    warmup: list[float] = field(default_factory=list)
    ema: float | None = None
    last: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.ema_start < self.filter_start:
            raise ValueError(
                f"the std filter needs 1 <= ema_start < filter_start, got {self.ema_start}, {self.filter_start}"
            )

    def begin_step(self) -> float | None:
        """Advance to the next step and return its bound (None: no filtering at this step)."""
        self.step += 1
        if self.step < self.filter_start:
            return None
        if self.ema is None:
            seeds = self.warmup or ([self.last] if self.last is not None else [])
            self.ema = sum(seeds) / len(seeds) if seeds else None
        elif self.last is not None:
            self.ema = self.momentum * self.ema + (1 - self.momentum) * self.last
        self.last = None
        return None if self.ema is None else self.beta * self.ema

    def bound(self) -> float | None:
        """The current step's bound (after `begin_step`)."""
        if self.step < self.filter_start or self.ema is None:
            return None
        return self.beta * self.ema

    def record(self, group_stds: torch.Tensor) -> None:
        """Record this step's group stds `[num_groups]` (all groups, before filtering; NaN/inf left out)."""
        if self.step < self.ema_start:
            return
        finite = group_stds[torch.isfinite(group_stds)]
        if finite.numel() == 0:
            return
        mean = float(finite.mean())
        if self.step < self.filter_start:
            self.warmup.append(mean)
        else:
            self.last = mean

    def filter(
        self, rewards: torch.Tensor, everyone: torch.Tensor, group_size: int
    ) -> tuple[float | None, torch.Tensor | None]:
        """One generation: its bound (`begin_step`), then its group stds recorded for the next ones
        (`everyone`: every rank's rewards), and the keep mask `[N]` of this rank's `rewards` (None: no
        filtering at this step). Returns (bound, keep)."""
        bound = self.begin_step()
        self.record(group_reward_std(everyone, group_size))
        return bound, (None if bound is None else rlpr_std_filter(rewards, group_size, bound))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "warmup": list(self.warmup), "ema": self.ema, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.warmup = [float(x) for x in state["warmup"]]
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.last = None if state["last"] is None else float(state["last"])


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
    answer_logp: torch.Tensor,
    answer_mask: torch.Tensor,
    trace_lengths: torch.Tensor | None = None,
    log_base: float = 10.0,
) -> torch.Tensor:
    """NOVER reasoning log-perplexity, `[B, T]` -> `[B]`: −Σ_t m_t ℓ_t / (|y*| · N(|z|)).

    N(|z|) = max(1, 1 + log_b |z|) with |z| the trace length in tokens (`trace_lengths [B]`) damps
    the length bias; b = 10 as in the released code (thinkwee/NOVER, `utils.py`,
    `calculate_perplexity`: `np.log10`), `log_base=math.e` for the natural log. Without
    `trace_lengths`, N = 1 (plain per-token log-perplexity). Lower is better; the reasoning
    perplexity is exp of this. The span is y* and the answer suffix, EOS not scored.
    """
    log_ppl = -log_gml_estimator(answer_logp, answer_mask)
    if trace_lengths is not None:
        lengths = torch.as_tensor(trace_lengths, device=answer_logp.device).to(log_ppl.dtype)
        log_lengths = torch.log(lengths.clamp(min=1)) / math.log(log_base)
        log_ppl = log_ppl / torch.clamp(1 + log_lengths, min=1.0)
    return log_ppl


def nover_rank(
    log_perplexity: torch.Tensor, group_size: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """NOVER's rank reward within each group, `[N] -> [N]`.

    The n valid entries of a group are sorted by log-perplexity, lowest first, ties in the order
    of the rows (a stable sort, as Python's `sorted` in thinkwee/NOVER `reward_functions.py`,
    `reasoning_reward`); the entry at position r (0-based) gets (n − r)/n: the best 1, the worst
    1/n. Invalid entries (`valid` False, or a NaN/inf log-perplexity) get 0 and are not ranked.
    """
    grouped = log_perplexity.view(-1, group_size)
    ok = torch.isfinite(grouped)
    if valid is not None:
        ok = ok & valid.bool().view(-1, group_size)
    keys = torch.where(ok, grouped, torch.full_like(grouped, math.inf))
    order = torch.sort(keys, dim=1, stable=True).indices
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(group_size, device=order.device).expand_as(order))
    count = ok.sum(dim=1, keepdim=True).to(log_perplexity.dtype)
    reward = (count - position.to(log_perplexity.dtype)) / count.clamp(min=1)
    return torch.where(ok, reward, torch.zeros_like(reward)).view(-1)


def nover_reward(
    answer_logp: torch.Tensor,
    answer_mask: torch.Tensor,
    group_size: int,
    trace_lengths: torch.Tensor | None = None,
    format_ok: torch.Tensor | None = None,
    log_base: float = 10.0,
    truncated: torch.Tensor | None = None,
    truncated_reward: TruncatedReward = 0.0,
    missing: torch.Tensor | None = None,
    missing_answer: str = "zero",
) -> torch.Tensor:
    """NOVER reasoning reward, `[B, T]` -> `[B]`: `nover_rank` of `nover_log_perplexity`, in {0} ∪ [1/n, 1].

    Within each prompt group, the trace whose reasoning makes y* least perplexing gets 1, the most
    perplexing of the n well-formatted ones 1/n; format-invalid completions (`format_ok` False,
    and truncated ones) get 0 and stay in the group, as in the released code. NOVER's format and
    efficiency rewards are separate reward functions. Missing markers: 0 (`"exclude"`: NaN).
    """
    valid = None if format_ok is None else format_ok.bool()
    if truncated is not None:
        not_cut = ~truncated.bool()
        valid = not_cut if valid is None else valid & not_cut
    if missing is not None and missing_answer != "score":
        present = ~missing.bool()
        valid = present if valid is None else valid & present
    reward = nover_rank(
        nover_log_perplexity(answer_logp, answer_mask, trace_lengths, log_base), group_size, valid
    )
    return _finish(reward, missing, missing_answer, truncated, truncated_reward)


def latro_reward(
    answer_logp: torch.Tensor,
    answer_mask: torch.Tensor,
    trace_logp: torch.Tensor,
    reference_trace_logp: torch.Tensor,
    beta: float = 0.05,
    truncated: torch.Tensor | None = None,
    truncated_reward: TruncatedReward = "none",
    missing: torch.Tensor | None = None,
    missing_answer: str = "exclude",
) -> torch.Tensor:
    """LaTRO reward, `[B, T]` and `[B]`, `[B]` -> `[B]`: log p(y*|x, z) − β (log q(z|x) − log π₀(z|x)).

    `trace_logp` = log q(z|x) is the sampling policy's sequence log-prob of the trace and
    `reference_trace_logp` = log π₀(z|x) the frozen reference's (sums over the policy tokens); the
    answer term is `answer_logprob(..., "sum")` (EOS not scored). Used with RLOO. β = 0.05 is the
    released trainer's `kl_coef` (SalesforceAIResearch/LaTRO, `LaTRO/trainer/trainer_config.py`).
    A log-likelihood: missing markers are `"exclude"`d or `"score"`d.
    """
    _log_reward_missing(missing_answer)
    reward = log_likelihood_estimator(answer_logp, answer_mask) - beta * (trace_logp - reference_trace_logp)
    return _finish(reward, missing, missing_answer, truncated, truncated_reward)


LIKELIHOOD_REWARDS = ("covrl", "jepo", "verifree", "rlpr", "nover", "latro")


def likelihood_reward(
    kind: str,
    answer_logp: torch.Tensor,
    answer_mask: torch.Tensor,
    group_size: int,
    truncated: torch.Tensor | None = None,
    truncated_reward: TruncatedReward = "none",
    missing: torch.Tensor | None = None,
    missing_answer: str = "exclude",
    reduction: str = "sum",
    trace_lengths: torch.Tensor | None = None,
    format_ok: torch.Tensor | None = None,
    log_base: float = 10.0,
    no_trace_probability: torch.Tensor | None = None,
    format_coef: float = 0.1,
    trace_logp: torch.Tensor | None = None,
    reference_trace_logp: torch.Tensor | None = None,
    latro_beta: float = 0.05,
) -> torch.Tensor:
    """The reward `[B]` of one family member from the answer's token log-probs `[B, T]` (rows group by
    group), with one rule for truncated and markerless samples for all of them:

    `covrl` / `jepo`: `answer_logprob` (`reduction` sum or mean); `verifree`: `verifree_reward`;
    `nover`: `nover_reward` (`trace_lengths`, `format_ok`, `log_base`); `rlpr`: `rlpr_reward`
    (`no_trace_probability`, `format_ok`, `format_coef`); `latro`: `latro_reward` (`trace_logp`,
    `reference_trace_logp`, `latro_beta`).
    """
    flags = dict(
        truncated=truncated, truncated_reward=truncated_reward, missing=missing, missing_answer=missing_answer
    )
    if kind in ("covrl", "jepo"):
        return answer_logprob(answer_logp, answer_mask, reduction, **flags)
    if kind == "verifree":
        return verifree_reward(answer_logp, answer_mask, **flags)
    if kind == "nover":
        return nover_reward(
            answer_logp,
            answer_mask,
            group_size,
            trace_lengths,
            format_ok=format_ok,
            log_base=log_base,
            **flags,
        )
    if kind == "rlpr":
        return rlpr_reward(
            answer_logp,
            answer_mask,
            no_trace_probability,
            format_ok=format_ok,
            format_coef=format_coef,
            **flags,
        )
    if kind == "latro":
        if trace_logp is None or reference_trace_logp is None:
            raise ValueError("the latro reward needs trace_logp and reference_trace_logp")
        return latro_reward(answer_logp, answer_mask, trace_logp, reference_trace_logp, latro_beta, **flags)
    raise ValueError(f"unknown likelihood reward {kind!r}; one of {', '.join(LIKELIHOOD_REWARDS)}")
