"""The `covrl:` recipe section: `CoVRLConfig`, its per-reward defaults and checks (`trainers/covrl.py`
is the trainer; each default names the released trainer it reproduces, see docs/covrl.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from reasoning.rewards.likelihood import MISSING_ANSWER, truncated_value
from reasoning.trainers.base import RolloutTrainerConfig

REWARDS = ("covrl", "verifree", "rlpr", "jepo", "nover", "latro", "verifier")
SOURCES = ("prior", "posterior")
LOSS_TYPES = ("grpo", "token_mean", "dr_grpo", "sum")
# `loss_type` -> `policy.aggregate_loss` reduction
AGGREGATION = {"grpo": "grpo", "token_mean": "token_mean", "dr_grpo": "dr_grpo", "sum": "sequence_sum"}
# rewards that are probabilities (p(y*|x,z) = 0 is reward 0) and log-likelihoods (log 0 = −∞)
PROBABILITY_REWARDS = ("verifree", "rlpr", "nover")
LOG_REWARDS = ("covrl", "jepo", "latro")
# verl's GRPO normalisation in the released RLPR trainer: Â = (r − mean)/(std + 1e-6), 0 where std < 1e-6
RLPR_STD_EPS = 1e-6


@dataclass
class CoVRLConfig(RolloutTrainerConfig):
    """The `covrl:` section of a recipe."""

    reward: str = field(
        default="covrl",
        metadata={
            "help": "Training reward: covrl (log p(y*|x,z)), verifree, rlpr, jepo, nover, latro, or verifier "
            "(the reward functions of the `reward:` section). With a likelihood reward those functions "
            "are only logged."
        },
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Hybrid sampling: probability that a trajectory is sampled from the prior prompt."},
    )
    sampling_level: str = field(
        default="rollout",
        metadata={"help": "Draw the source per rollout (rollout) or once per prompt group (group)."},
    )
    composite_weight: float | None = field(
        default=None,
        metadata={
            "help": "Prior weight w in p′ = w·p_φ + (1−w)·q_ψ (paper: ½). Default ½, or 1 when alpha = 1 "
            "(the policy is then the prior alone: no KL, no posterior pass, as in the baselines)."
        },
    )
    epsilon: float = field(default=0.3, metadata={"help": "Lower clipping range ε_low of the surrogate."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping range (default ε)."})
    ratio_to: str = field(
        default="behaviour",
        metadata={
            "help": "Ratio denominator: behaviour (old prior / old posterior by source, methods file) or "
            "composite (old p′, the plain PPO ratio)."
        },
    )
    scale_advantages: str | None = field(
        default=None,
        metadata={
            "help": "Advantage scale after the group baseline: none, group (std) or batch (std). "
            "Default: group for rlpr (its released trainer, eps 1e-6, groups with std < 1e-6 get 0), "
            "none otherwise."
        },
    )
    baseline: str | None = field(
        default=None,
        metadata={"help": "mean (group mean) or rloo (leave-one-out). Default: rloo for verifree and latro."},
    )
    kl_coef: float = field(
        default=1.0, metadata={"help": "Coefficient of the KL(p′ ‖ p_φ) loss term (1 = the ELBO's weight)."}
    )
    kl_weighting: str = field(
        default="token",
        metadata={"help": "KL estimator weight: token (p′/s per token, methods file) or sequence (prefix)."},
    )
    nll_coef: float | None = field(
        default=None,
        metadata={
            "help": "Selective NLL (prior-sampled, well-formed, Â > 0) coefficient: CoVRL's third loss term. "
            "Default: 0.1 for covrl, 0 for the baselines (their released trainers have no such term)."
        },
    )
    answer_nll_coef: float | None = field(
        default=None,
        metadata={
            "help": "Decoder term −w·log p(y*|x,z) (weights: R for verifree, self-normalised for jepo, 1 "
            "otherwise). Default: 1 for verifree and jepo, 0 otherwise."
        },
    )
    answer_reduction: str = field(
        default="sum",
        metadata={"help": "covrl/jepo reward: sum (log p(y*|x,z)) or mean (per answer token)."},
    )
    truncated_reward: Any = field(
        default=None,
        metadata={
            "help": 'Reward of truncated samples: "none" (excluded from the group, Â = 0), "score" (kept '
            "as scored) or a number. Default: 0 for verifree (p = 0, kept in the RLOO group) and nover "
            '(format-invalid: 0), "score" for rlpr (as their released trainers), "none" otherwise.'
        },
    )
    missing_answer: str | None = field(
        default=None,
        metadata={
            "help": "Completions without an answer marker: zero (p(y*|x,z) = 0: reward 0, kept in the group), "
            "exclude (no reward, Â = 0) or score (y* scored after the whole completion). Default: zero "
            "for verifree, rlpr, nover; exclude for covrl, jepo, latro (log 0 = −inf has no finite "
            "advantage, so zero is refused there)."
        },
    )
    score_eos: bool = field(
        default=False,
        metadata={
            "help": "Score EOS after y* in the likelihood rewards (the released VeriFree, RLPR, NOVER and "
            "variational-reasoning code do not)."
        },
    )
    policy_tokens: str = field(
        default="trace",
        metadata={
            "help": "Tokens under the surrogate and KL: trace (up to and including the answer marker; the "
            "whole completion when it has none) or completion (every generated token)."
        },
    )
    loss_type: str | None = field(
        default=None,
        metadata={
            "help": "Token aggregation: grpo (mean over tokens, then sequences), token_mean, dr_grpo, sum "
            "(sum over each trace, then mean over sequences: the released VeriFree and LaTRO trainers). "
            "Default: sum for verifree and latro, grpo otherwise."
        },
    )
    hint_column: str = field(
        default="answer", metadata={"help": "Column shown as the hint in the posterior prompt."}
    )
    answer_column: str = field(default="answer", metadata={"help": "Column holding the reference answer y*."})
    hint_after: bool = field(
        default=False, metadata={"help": "Posterior prompt states the answer first, then asks for the trace."}
    )
    latro_beta: float = field(default=0.05, metadata={"help": "LaTRO: β of the log(q/π₀) penalty."})
    rlpr_debias: bool = field(
        default=True, metadata={"help": "RLPR: subtract the no-trace mean token probability."}
    )
    rlpr_format_coef: float = field(
        default=0.1,
        metadata={
            "help": "RLPR: reward = (1 − c)·probability term + c·format check (released trainer: 0.1)."
        },
    )
    rlpr_std_filter: bool = field(
        default=True,
        metadata={"help": "RLPR: drop groups whose reward std is below β × EMA of the mean group std."},
    )
    rlpr_std_filter_beta: float = field(
        default=0.5,
        metadata={"help": "RLPR: β of the std bound (released scripts: 0.5 Qwen, 0.9 Llama, 1.0 Gemma)."},
    )
    rlpr_filter_momentum: float = field(
        default=0.99, metadata={"help": "RLPR: momentum of the EMA of the mean group std."}
    )
    rlpr_filter_ema_start: int = field(
        default=6,
        metadata={"help": "RLPR: first generation (1-based) whose mean group std seeds the EMA."},
    )
    rlpr_filter_start: int = field(
        default=11,
        metadata={
            "help": "RLPR: first generation that is filtered; the EMA starts as the mean over generations "
            "rlpr_filter_ema_start .. rlpr_filter_start − 1."
        },
    )
    nover_log_base: float = field(
        default=10.0,
        metadata={
            "help": "NOVER: base of the log in the length normaliser max(1, 1 + log |z|) (released code: 10)."
        },
    )
    scoring_batch_size: int = field(
        default=64, metadata={"help": "Sequences per forward when scoring the reference answer."}
    )

    def __post_init__(self) -> None:
        _one_of("reward", self.reward, REWARDS)
        if self.scale_advantages is None:
            self.scale_advantages = "group" if self.reward == "rlpr" else "none"
        if self.loss_type is None:
            self.loss_type = "sum" if self.reward in ("verifree", "latro") else "grpo"
        if self.truncated_reward is None:
            self.truncated_reward = {"verifree": 0.0, "nover": 0.0, "rlpr": "score"}.get(self.reward, "none")
        if self.missing_answer is None:
            self.missing_answer = "zero" if self.reward in PROBABILITY_REWARDS else "exclude"
        _one_of("sampling_level", self.sampling_level, ("rollout", "group"))
        _one_of("ratio_to", self.ratio_to, ("behaviour", "composite"))
        _one_of("scale_advantages", self.scale_advantages, ("none", "group", "batch"))
        _one_of("kl_weighting", self.kl_weighting, ("token", "sequence"))
        _one_of("answer_reduction", self.answer_reduction, ("sum", "mean"))
        _one_of("policy_tokens", self.policy_tokens, ("trace", "completion"))
        _one_of("loss_type", self.loss_type, LOSS_TYPES)
        _one_of("missing_answer", self.missing_answer, MISSING_ANSWER)
        if self.missing_answer == "zero" and self.reward in LOG_REWARDS:
            raise ValueError(
                f"missing_answer zero gives the {self.reward} reward log p(y*|x,z) = log 0 = -inf, which has "
                "no finite advantage; use exclude or score"
            )
        if not 0.0 <= self.rlpr_format_coef <= 1.0:
            raise ValueError(f"rlpr_format_coef must be in [0, 1], got {self.rlpr_format_coef}")
        if not 1 <= self.rlpr_filter_ema_start < self.rlpr_filter_start:
            raise ValueError(
                "rlpr_filter_ema_start must be >= 1 and below rlpr_filter_start, got "
                f"{self.rlpr_filter_ema_start} and {self.rlpr_filter_start}"
            )
        if self.rlpr_std_filter_beta < 0 or not 0.0 <= self.rlpr_filter_momentum < 1.0:
            raise ValueError(
                "rlpr_std_filter_beta must be >= 0 and rlpr_filter_momentum in [0, 1), got "
                f"{self.rlpr_std_filter_beta} and {self.rlpr_filter_momentum}"
            )
        if self.nover_log_base <= 1.0:
            raise ValueError(
                f"nover_log_base must be > 1 (10, or e for the natural log), got {self.nover_log_base}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.composite_weight is None:
            self.composite_weight = 1.0 if self.alpha == 1.0 else 0.5
        if not 0.0 < self.composite_weight <= 1.0:
            raise ValueError(f"composite_weight must be in (0, 1], got {self.composite_weight}")
        if self.baseline is None:
            self.baseline = "rloo" if self.reward in ("verifree", "latro") else "mean"
        _one_of("baseline", self.baseline, ("mean", "rloo"))
        if self.nll_coef is None:
            self.nll_coef = 0.1 if self.reward == "covrl" else 0.0
        if self.answer_nll_coef is None:
            self.answer_nll_coef = 1.0 if self.reward in ("verifree", "jepo") else 0.0
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.truncated_reward not in ("none", "score"):
            value = truncated_value(self.truncated_reward)
            if not math.isfinite(value):
                raise ValueError(
                    f'truncated_reward must be "none", "score" or a finite number, got {self.truncated_reward!r}'
                )
        if self.baseline == "rloo" and self.num_generations < 2:
            raise ValueError("the rloo baseline needs num_generations >= 2")


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")
