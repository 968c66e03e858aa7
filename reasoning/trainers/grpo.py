"""GRPO and its family: grpo, dr_grpo, dapo losses; RFT; the accuracy-debiased variant.

For each prompt x, G completions y_i ~ π_old(·|x) with rewards r_i; advantage
Â_i = (r_i − mean_j r_j) / s, with s the group std (`scale_rewards: group`), the batch std
(`batch`), 1 (`none`) or the group mean (`accuracy`: the accuracy-debiased forward-KL variant
of Zhou et al. Eqs. 10–12, which divides each question's gradient by its estimated accuracy P̂).
Loss per token: −min(ρ_t Â_i, clip(ρ_t, 1−ε_low, 1+ε_high) Â_i) + β·k3(π, π_ref), with
ρ_t = π_θ(y_t|·)/π_old(y_t|·); aggregated per `loss_type` (grpo: mean over tokens then over
sequences; dapo: sum over the tokens of the whole generation batch / their count; dr_grpo:
sum / (B × max_completion_length)). `loss_type: rft` is rejection-sampling fine-tuning:
−Σ_i w_i · mean_t log π_θ(y_t|·) / B with w_i = 1[r_i ≥ threshold], or 1[r_i ≥ threshold]/P̂
when `accuracy_debiased` (every solved question then weighs the same, whatever its accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from reasoning.objectives.logprobs import masked_mean
from reasoning.objectives.policy import (
    aggregate_loss,
    clipped_surrogate,
    debiased_accuracy_weights,
    group_advantages,
    kl_estimate,
    truncated_importance_weights,
    weighted_nll,
)
from reasoning.rollout import Rollout
from reasoning.trainers.base import RolloutTrainer, RolloutTrainerConfig, is_peft_model

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "rft")
SCALES = ("group", "batch", "none", "accuracy")


@dataclass
class GRPOConfig(RolloutTrainerConfig):
    """The `grpo:` section of a recipe."""

    loss_type: str = field(default="dapo", metadata={"help": "grpo, dr_grpo, dapo or rft."})
    beta: float = field(
        default=0.0, metadata={"help": "KL coefficient to the frozen initial policy (0 = none)."}
    )
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping range ε_low."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clipping range (default ε_low)."}
    )
    scale_rewards: str = field(
        default="group",
        metadata={"help": "Advantage scale: group (std), batch (std), none, accuracy (mean)."},
    )
    importance_sampling_level: str = field(default="token", metadata={"help": "token or sequence (GSPO)."})
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Exclude completions that hit max_tokens from the loss."}
    )
    tis_cap: float | None = field(
        default=None,
        metadata={
            "help": "Truncated importance-sampling correction for engine/trainer log-prob mismatch (cap)."
        },
    )
    rft_threshold: float = field(default=1.0, metadata={"help": "RFT keeps completions with reward ≥ this."})
    accuracy_debiased: bool = field(
        default=False, metadata={"help": "RFT: weight verified samples by 1/P̂ of their question."}
    )

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALES:
            raise ValueError(f"scale_rewards {self.scale_rewards!r} is not one of {', '.join(SCALES)}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"importance_sampling_level must be token or sequence, not {self.importance_sampling_level!r}"
            )


class GRPOTrainer(RolloutTrainer):
    """Group-relative policy optimisation on engine rollouts (see the module docstring)."""

    config: GRPOConfig

    def __init__(self, *args: Any, ref_model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ref_model = ref_model
        if self.config.beta > 0 and ref_model is None and not is_peft_model(self.model):
            self.ref_model = self.policy_copy()  # under ZeRO-3: a partitioned inference engine

    def build_batch(
        self, rows: list[dict[str, Any]], groups: list[list[Rollout]], rewards: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch = super().build_batch(rows, groups, rewards)
        total, size = batch["rewards"], self.config.num_generations
        if self.config.loss_type == "rft":
            verified = total >= self.config.rft_threshold
            if self.config.accuracy_debiased:
                batch["weights"] = debiased_accuracy_weights(verified, size)
            else:
                batch["weights"] = verified.float()
            self.record("rft/kept_fraction", verified.float().mean())
        elif self.config.scale_rewards == "accuracy":
            # (r − P̂)/P̂ = 1[correct]/P̂ − 1: the debiased weights with the group-mean baseline.
            weights = debiased_accuracy_weights(total >= self.config.rft_threshold, size)
            solved = weights.view(-1, size).sum(dim=1, keepdim=True) > 0
            batch["advantages"] = ((weights.view(-1, size) - 1.0) * solved).view(-1)
        else:
            # on every rank's rewards: `batch` scaling divides by the std of the global batch
            everyone, mine = self.gather_generation(total)
            batch["advantages"] = group_advantages(everyone, size, scale=self.config.scale_rewards)[mine]
        if self.config.mask_truncated_completions:
            batch["completion_mask"] = batch["completion_mask"] * (~batch["truncated"]).unsqueeze(1).long()
        if self.config.beta > 0:
            batch["ref_logprobs"] = self.reference_logprobs(batch)
        # Global token count of this generation (all ranks): the dapo normaliser.
        tokens = batch["completion_mask"].sum().to(self.accelerator.device)
        batch["generation_tokens"] = self.accelerator.reduce(tokens, reduction="sum").float().cpu()
        return batch

    @torch.no_grad()
    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.ref_model is not None:
            return self.logprobs_without_grad(self.ref_model, batch)
        with self.accelerator.unwrap_model(self.model).disable_adapter():
            return self.logprobs_without_grad(self.model, batch)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        mask = batch["completion_mask"].float()
        logp, entropy = self.policy_logprobs(model, batch, with_entropy=True)
        self.record("entropy", masked_mean(entropy.detach(), mask))
        # the training loop sets the accumulation length of the current window (shorter at an epoch end)
        accumulation = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        accumulation = accumulation if model.training else 1
        if cfg.loss_type == "rft":
            return weighted_nll(logp, mask, batch["weights"]) / accumulation
        old = batch.get("old_logprobs")
        old = logp.detach() if old is None else old
        if "engine_logprobs" in batch:
            mismatch = (old - batch["engine_logprobs"].to(old.device)).abs()
            self.record("sampling/logp_difference_mean", masked_mean(mismatch, mask))
        per_token, stats = clipped_surrogate(
            logp,
            old,
            batch["advantages"],
            eps_low=cfg.epsilon,
            eps_high=cfg.epsilon_high,
            importance_level=cfg.importance_sampling_level,
            mask=mask,
        )
        for name, value in stats.items():
            self.record(f"clip_ratio/{name}", value)
        if cfg.tis_cap is not None:
            weights = truncated_importance_weights(old, batch["engine_logprobs"], cap=cfg.tis_cap, mask=mask)
            per_token = per_token * weights
        if cfg.beta > 0:
            kl = kl_estimate(logp, batch["ref_logprobs"], kind="k3")
            self.record("kl", masked_mean(kl.detach(), mask))
            per_token = per_token + cfg.beta * kl
        if cfg.loss_type == "dapo":
            # Each micro-batch's share of the generation's global token count, as TRL does.
            normalizer = batch["generation_tokens"].to(logp.device) / self.accelerator.num_processes
            if model.training:
                normalizer = normalizer * accumulation / self.steps_per_generation
            return (per_token * mask).sum() / normalizer.clamp(min=1.0)
        loss = aggregate_loss(
            per_token, mask, loss_type=cfg.loss_type, max_completion_length=self.sampling.max_tokens
        )
        return loss / accumulation
