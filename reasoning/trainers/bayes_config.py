"""The `bayes:` section of a recipe (`BayesConfig`) and the named features φ its `moment_features` choose
from (`FEATURES`); both re-exported by `reasoning.trainers.bayes`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reasoning.data.templates import PlainTemplate
from reasoning.rewards.math import extract_answer
from reasoning.rewards.verifier import correctness
from reasoning.trainers.base import RewardFunction, RolloutTrainerConfig

DIVERGENCES = ("fkl", "rkl", "js", "tv")
TARGETS = ("tilt", "pointwise", "moments")
PROPOSALS = ("online", "offline")
UPDATE_METRICS = ("kl", "tv", "always")
BASELINES = ("gdc++", "moving_average", "none")


@dataclass
class BayesConfig(RolloutTrainerConfig):
    """The `bayes:` section of a recipe."""

    divergence: str = field(
        default="fkl",
        metadata={"help": "fkl (DPG: KL(p‖π)), rkl (KL-RL: KL(π‖p)), js or tv (f-DPG)."},
    )
    target: str = field(
        default="pointwise",
        metadata={"help": "tilt a·exp(r/β), pointwise a·1[r ≥ threshold], moments a·exp(λ·φ)."},
    )
    beta: float = field(default=0.1, metadata={"help": "Temperature β of the tilt a·exp(r/β)."})
    constraint_threshold: float = field(
        default=1.0, metadata={"help": "Pointwise constraint b(x) = 1[combined reward ≥ this]."}
    )
    moment_features: list[str] = field(
        default_factory=list,
        metadata={"help": "Feature names φ_i of a moment target (uses_multiplication, correct, ...)."},
    )
    moment_targets: list[float] = field(
        default_factory=list, metadata={"help": "Target moments E_p[φ_i], one per feature."}
    )
    moment_lambdas: list[float] | None = field(
        default=None, metadata={"help": "Fixed λ of the moment target (default: fitted before training)."}
    )
    moment_fit_samples: int = field(
        default=512, metadata={"help": "Samples from the proposal used to fit λ by self-normalised IS."}
    )
    moments_with_constraint: bool = field(
        default=False,
        metadata={"help": "Moment target on top of the pointwise one: a·b·exp(λ·φ) (moments of correct x)."},
    )
    proposal: str = field(
        default="online", metadata={"help": "online (q = π) or offline (q = a frozen snapshot of π)."}
    )
    proposal_update_every: int = field(
        default=1, metadata={"help": "Offline: consider replacing q by π every this many generations."}
    )
    proposal_update_metric: str = field(
        default="kl",
        metadata={"help": "Offline update rule: kl (KL(p‖π) < KL(p‖q)), tv, or always (periodic snapshot)."},
    )
    baseline: str = field(
        default="gdc++",
        metadata={
            "help": "gdc++ (c·π/q, c = 1 for fkl), moving_average (b·π/q, b = windowed mean of −f′(π/p), "
            "as naver/disco) or none."
        },
    )
    baseline_window: int = field(
        default=1024,
        metadata={
            "help": "moving_average: b averages −f′(π/p) over the last this many samples (disco: 1024)."
        },
    )
    conditional: bool = field(
        default=True, metadata={"help": "One Z per prompt (conditional target) instead of one for the batch."}
    )
    z_window: int = field(
        default=0, metadata={"help": "Ẑ pools the last W estimates (per prompt when conditional); 0 = all."}
    )
    max_pseudo_reward: float | None = field(
        default=None, metadata={"help": "Clip |R − B| at this value (biased; tames offline weights)."}
    )
    score_with_sampling_warpers: bool = field(
        default=False,
        metadata={
            "help": "Allow temperature ≠ 1 / top-k / top-p: a, π and q are then the warped distributions."
        },
    )

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("divergence", self.divergence, DIVERGENCES),
            ("target", self.target, TARGETS),
            ("proposal", self.proposal, PROPOSALS),
            ("proposal_update_metric", self.proposal_update_metric, UPDATE_METRICS),
            ("baseline", self.baseline, BASELINES),
        ):
            if value not in choices:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta} (β → 0 is the pointwise target)")
        if self.divergence == "rkl" and (
            self.target == "pointwise" or (self.target == "moments" and self.moments_with_constraint)
        ):
            raise ValueError(
                "divergence rkl (KL-RL) needs a target with P(x) > 0 everywhere: KL(π‖p) is infinite when "
                "p(x) = 0 where π(x) > 0; use target tilt (a·exp(r/β), small β approaches the constraint) "
                "or divergence fkl / js / tv"
            )
        if self.target == "moments":
            if not self.moment_features:
                raise ValueError("target moments needs moment_features (e.g. [uses_multiplication])")
            given = self.moment_lambdas if self.moment_lambdas is not None else self.moment_targets
            if len(given) != len(self.moment_features):
                what = "moment_lambdas" if self.moment_lambdas is not None else "moment_targets"
                raise ValueError(
                    f"{len(self.moment_features)} moment_features but {len(given)} {what}; give one per feature"
                )
        if self.proposal_update_every < 1:
            raise ValueError(f"proposal_update_every must be >= 1, got {self.proposal_update_every}")
        if self.baseline_window < 1:
            raise ValueError(f"baseline_window must be >= 1 (samples), got {self.baseline_window}")
        if self.z_window < 0:
            raise ValueError(f"z_window must be >= 0 (0 = all samples), got {self.z_window}")


# ------------------------------------------------------------------------------------- features


def final_answer(text: str) -> str | None:
    """The final answer of a completion: after the plain template's `A:` marker, else a boxed answer."""
    _, answer = PlainTemplate().split_completion(text)
    return answer if answer is not None else extract_answer(text)


def _answer_uses(symbol: str, name: str) -> RewardFunction:
    def feature(prompts: list, completions: list, **columns: Any) -> list[float]:
        answers = [final_answer(str(c)) for c in completions]
        return [float(a is not None and symbol in a) for a in answers]

    feature.__name__ = name
    return feature


# Named features φ(x) for moment targets, TRL reward signature; more can be passed as `feature_funcs=`.
FEATURES: dict[str, RewardFunction] = {
    "uses_multiplication": _answer_uses("*", "uses_multiplication"),
    "uses_division": _answer_uses("/", "uses_division"),
    "uses_addition": _answer_uses("+", "uses_addition"),
    "uses_subtraction": _answer_uses("-", "uses_subtraction"),
    "correct": correctness,
}
