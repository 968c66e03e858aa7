"""The `gflownet:` recipe section: `GFlowNetConfig` and its checks (`trainers/gflownet.py` is the
trainer, re-exporting it; docs/gflownet.md explains each choice)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from reasoning.objectives.gflownet import NORMALIZATIONS, SCHEDULES
from reasoning.trainers.base import RolloutTrainerConfig

LOSSES = ("tb", "subtb", "db", "modified_subtb")
REWARDS = ("verifier", "likelihood", "product")
TERMINALS = ("eos", "answer")
LOG_Z_KINDS = ("scalar", "prompt")
# `likelihood_model` -> `RolloutTrainer.frozen_model` kind
LIKELIHOOD_MODELS = {"auto": "auto", "frozen_copy": "copy", "disable_adapter": "adapter"}


@dataclass
class GFlowNetConfig(RolloutTrainerConfig):
    """The `gflownet:` section of a recipe."""

    loss: str = field(default="tb", metadata={"help": "tb, subtb, db or modified_subtb."})
    log_z: str = field(
        default="scalar",
        metadata={"help": "TB's log Z: scalar, or prompt (MLP on the prompt's last hidden state)."},
    )
    log_z_init: float = field(
        default=0.0, metadata={"help": "Initial value of log Z (the head's output bias)."}
    )
    log_z_lr: float = field(
        default=0.05,
        metadata={"help": "Learning rate of the log Z / flow heads (their own optimizer group)."},
    )
    head_hidden_size: int = field(
        default=64, metadata={"help": "Hidden width of the log Z and flow MLP heads."}
    )
    subtb_lambda: float = field(default=1.0, metadata={"help": "λ of SubTB(λ) and modified SubTB (λ ≥ 0)."})
    subtb_normalization: str | None = field(
        default=None,
        metadata={
            "help": "SubTB pair weights normalised per sequence (sequence: torchgfn's geometric_within) or "
            "over each prompt's samples (gfn-lm-tuning: Hu et al.'s code, each sequence weighs by its pairs). "
            "Default: gfn-lm-tuning for modified_subtb, sequence for subtb."
        },
    )
    terminal: str = field(
        default="eos",
        metadata={
            "help": "eos: trajectory = completion, ⊤ = EOS; answer: trajectory = trace, ⊤ = answer marker."
        },
    )
    reward: str = field(default="verifier", metadata={"help": "verifier, likelihood or product."})
    reward_floor: float = field(
        default=1e-4, metadata={"help": "Task rewards are clamped below at this value before the log."}
    )
    answer_column: str = field(
        default="answer", metadata={"help": "Dataset column with the known answer y*."}
    )
    likelihood_model: str = field(
        default="auto",
        metadata={
            "help": "Frozen base (likelihood rewards, base_prior): auto, frozen_copy or disable_adapter (PEFT)."
        },
    )
    base_prior: bool = field(
        default=False,
        metadata={"help": "Add log p_base(s⊤|x), the frozen base's probability of the terminal object."},
    )
    prefix_reward_stride: int = field(
        default=1,
        metadata={"help": "modified_subtb: compute log R(s_k⊤) every this many tokens, interpolate."},
    )
    scoring_batch_size: int = field(default=64, metadata={"help": "Sequences per base-model scoring batch."})
    reward_temperature_start: float = field(
        default=1.0, metadata={"help": "Reward temperature T_R at step 0."}
    )
    reward_temperature_end: float | None = field(
        default=None, metadata={"help": "T_R at the end of the schedule (default: the start value)."}
    )
    reward_temperature_steps: int | None = field(
        default=None, metadata={"help": "Steps of the T_R schedule (default: training.max_steps)."}
    )
    reward_temperature_schedule: str = field(
        default="linear", metadata={"help": "constant, linear or cosine."}
    )
    allowed_characters: str | None = field(
        default=None, metadata={"help": "Characters a legal generated token may contain (None: all legal)."}
    )
    illegal_token_penalty: float = field(
        default=0.0, metadata={"help": "Subtracted from log R per illegal generated token."}
    )
    truncated_log_reward: float | None = field(
        default=None, metadata={"help": "log R of completions that never stop (default: log reward_floor)."}
    )
    replay_probability: float = field(
        default=0.0, metadata={"help": "Probability that a generation is replayed from the buffer."}
    )
    tempered_probability: float = field(
        default=0.0, metadata={"help": "Probability that a generation samples at a random temperature."}
    )
    temperature_range: list[float] = field(
        default_factory=lambda: [0.5, 2.0],
        metadata={"help": "[low, high] of the tempered sampling temperature."},
    )
    replay_capacity: int = field(
        default=16, metadata={"help": "Completions kept per prompt (top-k by log R)."}
    )
    replay_edit_distance: float = field(
        default=0.0,
        metadata={"help": "Near-duplicate threshold: edit distance / length ≤ this (0: exact dedup only)."},
    )
    replay_min_log_reward: float | None = field(
        default=None, metadata={"help": "Only completions with untempered log R above this enter the buffer."}
    )

    def __post_init__(self) -> None:
        choices = {
            "loss": LOSSES,
            "reward": REWARDS,
            "terminal": TERMINALS,
            "reward_temperature_schedule": SCHEDULES,
            "log_z": LOG_Z_KINDS,
            "likelihood_model": tuple(LIKELIHOOD_MODELS),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(valid)}")
        if self.subtb_lambda < 0:
            raise ValueError(f"subtb_lambda must be >= 0, got {self.subtb_lambda}")
        if self.subtb_normalization is not None and self.subtb_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"subtb_normalization {self.subtb_normalization!r} is not one of {', '.join(NORMALIZATIONS)} "
                "(or null: each loss's reference)"
            )
        if not 0 < self.reward_floor <= 1:
            raise ValueError(f"reward_floor must be in (0, 1], got {self.reward_floor}")
        if self.reward_temperature_start <= 0 or (self.reward_temperature_end or 1.0) <= 0:
            raise ValueError("reward temperatures must be > 0")
        if self.prefix_reward_stride < 1:
            raise ValueError(f"prefix_reward_stride must be >= 1, got {self.prefix_reward_stride}")
        if self.replay_probability < 0 or self.tempered_probability < 0:
            raise ValueError("replay_probability and tempered_probability must be >= 0")
        if self.replay_probability + self.tempered_probability > 1:
            raise ValueError("replay_probability + tempered_probability must be <= 1")
        low, high = self.temperature_range
        if not 0 < low <= high:
            raise ValueError(
                f"temperature_range must be [low, high] with 0 < low <= high, got {self.temperature_range}"
            )
        if self.replay_capacity < 1:
            raise ValueError(f"replay_capacity must be >= 1, got {self.replay_capacity}")

    def resolved_subtb_normalization(self) -> str:
        """`subtb_normalization`, or each loss's reference: gfn-lm-tuning (modified_subtb), sequence (subtb)."""
        if self.subtb_normalization is not None:
            return self.subtb_normalization
        return "gfn-lm-tuning" if self.loss == "modified_subtb" else "sequence"

    def needs_base(self) -> bool:
        """Whether the frozen base model scores anything (a likelihood reward or the base prior)."""
        return self.reward in ("likelihood", "product") or self.base_prior

    def resolved_truncated_log_reward(self) -> float:
        """log R of a completion that never reaches ⊤: `truncated_log_reward`, else log `reward_floor`."""
        return (
            self.truncated_log_reward
            if self.truncated_log_reward is not None
            else math.log(self.reward_floor)
        )
