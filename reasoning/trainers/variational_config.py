"""The `variational:` recipe section (`VariationalConfig`) and the pipeline's launch rule
(`single_process_problem`); `trainers/variational.py` is the pipeline, docs/variational.md the page."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

ESTIMATORS = ("acc", "gml", "l")
FINAL_DATA = ("weighted", "argmax")
POSTERIOR_TRAINING = ("sft", "forward_kl", "reverse_kl")


@dataclass
class VariationalConfig:
    """The `variational:` section of a recipe."""

    estimator: str = field(
        default="acc", metadata={"help": "Estimator of π(Y|x,z) in the weight: acc, gml or l (Eq. 8)."}
    )
    num_traces: int = field(default=8, metadata={"help": "K: traces sampled per question from q_φ."})
    trace_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the traces."})
    answer_samples: int = field(
        default=8, metadata={"help": "Answers sampled from π_θ0 after each trace for Acc (0 = skip)."}
    )
    answer_temperature: float = field(default=0.7, metadata={"help": "Temperature of those answers."})
    answer_max_tokens: int = field(default=32, metadata={"help": "Token budget of a sampled answer."})
    hint_column: str = field(
        default="answer", metadata={"help": "Column given to q_φ as the hint y′ (answer or solution)."}
    )
    hint_after: bool = field(
        default=False,
        metadata={"help": "Posterior order answer-then-explanation instead of hint-then-trace."},
    )
    no_hint: bool = field(
        default=False, metadata={"help": "Ablation: sample traces from π_θ0 (no hint) instead of q_φ."}
    )
    final_data: str = field(
        default="weighted",
        metadata={"help": "weighted: all traces with weights K·ρ̃; argmax: best trace + the original data."},
    )
    final_init: str = field(
        default="base", metadata={"help": "Model the final SFT starts from: base (paper) or prior."}
    )
    num_questions: int | None = field(
        default=None, metadata={"help": "Sample traces for at most this many training questions."}
    )
    prior_path: str | None = field(
        default=None, metadata={"help": "An existing prior checkpoint: skips stage 1."}
    )
    posterior_path: str | None = field(
        default=None, metadata={"help": "An existing posterior checkpoint: skips stage 2."}
    )
    prior_steps: int | None = field(
        default=None, metadata={"help": "max_steps of stage 1 (default: training)."}
    )
    posterior_steps: int | None = field(
        default=None, metadata={"help": "max_steps of stage 2 (default: training.max_steps)."}
    )
    final_steps: int | None = field(
        default=None, metadata={"help": "max_steps of stage 7 (default: training)."}
    )
    dr_sft: bool = field(
        default=True, metadata={"help": "Dr. SFT loss (global constant) in every SFT stage."}
    )
    max_length: int = field(default=512, metadata={"help": "Drop SFT samples longer than this many tokens."})
    scoring_batch_size: int = field(default=64, metadata={"help": "Batch size of teacher-forced scoring."})
    posterior_training: str = field(
        default="sft",
        metadata={
            "help": "How q_φ is trained: sft (hint template on the data's traces, the released pipeline), "
            "forward_kl (Eq. 9: π_θ0's own traces weighted by π̂(Y|x,z)), reverse_kl (score-function "
            "steps on q's traces with reward log π_θ0(z,Y|x) − log q; for comparison)"
        },
    )
    posterior_init: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint the forward/reverse-KL posterior starts from (default: base, or hint SFT)."
        },
    )
    rounds: int = field(
        default=1,
        metadata={
            "help": "Rounds T of Algorithm 1: round t ≥ 2 uses round t−1's model as π and Eq. 9 for q."
        },
    )
    heldout: str | None = field(
        default=None,
        metadata={
            "help": "Held-out records (any data source) on which to measure the IWAE bound for K' ≤ K."
        },
    )
    heldout_questions: int = field(default=100, metadata={"help": "Held-out questions used for the bound."})

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.final_data not in FINAL_DATA:
            raise ValueError(f"final_data must be one of {FINAL_DATA}, got {self.final_data!r}")
        if self.final_init not in ("base", "prior"):
            raise ValueError(f"final_init must be 'base' or 'prior', got {self.final_init!r}")
        if self.num_traces < 1:
            raise ValueError(f"num_traces must be >= 1, got {self.num_traces}")
        if self.posterior_training not in POSTERIOR_TRAINING:
            raise ValueError(
                f"posterior_training must be one of {POSTERIOR_TRAINING}, got {self.posterior_training!r}"
            )
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.estimator == "acc" and self.answer_samples < 1:
            raise ValueError("estimator 'acc' needs answer_samples >= 1 (answers sampled after each trace)")


def single_process_problem(training: Mapping[str, Any], env: Mapping[str, str] | None = None) -> str | None:
    """Why this launch cannot run the pipeline (None when it can): it must be one process, without DeepSpeed.

    Several processes (WORLD_SIZE > 1, set by torchrun and `accelerate launch`) would each run the
    unsharded stages whole and write the same stage folders. DeepSpeed (`training.deepspeed`, or
    `accelerate launch` with a DeepSpeed config: ACCELERATE_USE_DEEPSPEED) would make the stages'
    own `from_pretrained` loads ZeRO-3 partitioned while a DeepSpeed TrainingArguments is alive
    (transformers' `is_deepspeed_zero3_enabled`), which scoring and sampling cannot use.
    """
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = max(world, torch.distributed.get_world_size())
    fix = (
        "launch it as one process: `reasoning train RECIPE.yaml` or `accelerate launch --config_file "
        "recipes/accelerate/single_gpu.yaml -m reasoning train RECIPE.yaml`. To train its SFT stages on several "
        "GPUs, run them as `trainer: sft` recipes and pass the models as variational.prior_path / posterior_path"
    )
    if world > 1:
        return (
            f"the variational pipeline runs in one process, and this launch starts {world} (WORLD_SIZE): its "
            "sampling, scoring and weighting stages are not sharded, so every process would run them whole and "
            f"write the same stage folders; {fix}"
        )
    if training.get("deepspeed") or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("true", "1", "yes"):
        source = (
            "training.deepspeed"
            if training.get("deepspeed")
            else "the accelerate config (ACCELERATE_USE_DEEPSPEED)"
        )
        return (
            f"the variational pipeline does not run under DeepSpeed ({source}): its stages load models with "
            f"from_pretrained, which DeepSpeed ZeRO-3 would load partitioned; {fix} (and no training.deepspeed)"
        )
    return None
