"""The `variational_online:` section of a recipe (`OnlineVariationalConfig`, re-exported by
`reasoning.trainers.variational_online`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from reasoning.trainers.base import RolloutTrainerConfig
from reasoning.trainers.variational_config import ESTIMATORS

POSTERIOR_OBJECTIVES = ("forward_kl", "reverse_kl")


@dataclass
class OnlineVariationalConfig(RolloutTrainerConfig):
    """The `variational_online:` section of a recipe. `num_generations` is K (traces from q_φ per
    question in a θ-step) and M (traces from π_θ per question in a forward-KL φ-step)."""

    estimator: str = field(
        default="acc", metadata={"help": "Estimator of π_θ(Y|x,z) in both weights: acc, gml or l (Eq. 8)."}
    )
    posterior_objective: str = field(
        default="forward_kl",
        metadata={
            "help": "φ-step: forward_kl (Eq. 9, traces from π_θ weighted by π̂(Y|x,z)) or reverse_kl "
            "(score function on q's own traces with reward log π_θ(z,Y|x) − log q_φ; for comparison)."
        },
    )
    answer_samples: int = field(
        default=4, metadata={"help": "Acc: answers sampled from π_θ after each trace (0 only with gml/l)."}
    )
    answer_temperature: float = field(default=0.7, metadata={"help": "Temperature of those answers."})
    answer_max_tokens: int = field(default=16, metadata={"help": "Token budget of a sampled answer."})
    correct_threshold: float = field(
        default=1.0,
        metadata={"help": "A completion is correct when its combined reward is at least this."},
    )
    phi_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of φ's AdamW."})
    phi_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of φ's AdamW."})
    phi_max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip φ's gradient norm to this (null = no clipping)."}
    )
    phi_steps: int = field(
        default=1, metadata={"help": "φ-steps per cycle, each on fresh rollouts (0 = q_φ stays fixed)."}
    )
    theta_steps: int = field(
        default=1, metadata={"help": "θ-steps (Trainer optimizer steps) per cycle; φ-steps come first."}
    )
    shared_posterior: bool = field(
        default=False,
        metadata={
            "help": "q_φ is π_θ's own network with the hint template (as in CoVRL), not a second model."
        },
    )
    posterior_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint q_φ starts from (e.g. a hint-SFT posterior); default: a copy of θ."},
    )
    hint_column: str = field(default="answer", metadata={"help": "Column shown to q_φ as the hint y′."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the reference answer."})
    hint_after: bool = field(
        default=False,
        metadata={"help": "Posterior order answer-then-explanation instead of hint-then-trace."},
    )
    fallback_to_reference: bool = field(
        default=True,
        metadata={"help": "A question with no weighted trace trains θ on its reference solution (weight 1)."},
    )
    scoring_batch_size: int = field(
        default=64, metadata={"help": "Sequences per forward when scoring traces and answers."}
    )

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.posterior_objective not in POSTERIOR_OBJECTIVES:
            raise ValueError(
                f"posterior_objective must be one of {POSTERIOR_OBJECTIVES}, got {self.posterior_objective!r}"
            )
        if self.estimator == "acc" and self.answer_samples < 1:
            raise ValueError("estimator 'acc' needs answer_samples >= 1 (answers sampled after each trace)")
        if self.phi_steps < 0 or self.theta_steps < 1:
            raise ValueError(
                f"need phi_steps >= 0 and theta_steps >= 1, got {self.phi_steps}, {self.theta_steps}"
            )
        if self.shared_posterior and self.posterior_path:
            raise ValueError(
                "shared_posterior uses θ's own network as q_φ: remove posterior_path (or the flag)"
            )
        if self.num_iterations != 1:
            raise ValueError(
                f"the online trainer samples fresh rollouts for every step: num_iterations must be 1, "
                f"got {self.num_iterations}"
            )
