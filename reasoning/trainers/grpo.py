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

`dynamic_sampling` (DAPO §3.3): groups whose raw task metric (`dynamic_sampling_metric`, a reward
function's own column, not the shaped total) is the same for all G completions have Â = 0 and are
dropped; more prompts are sampled (`refill_rows`) until the generation holds its full number of
groups, at most `max_generation_batches` batches.

`max_staleness` > 0 (one-step-off rollouts, `trainers.async_rollouts`): the rollouts were sampled by
older weights μ; each token's loss (and RFT's log-likelihood term) is multiplied by the truncated
importance weight min(π_old(y_t)/μ(y_t), is_truncation) (`objectives.policy.off_policy_weights`),
π_old being the policy when the step starts and μ the engine's processed log-probs, both at the
sampling temperature.

`max_tokens_per_microbatch` (token-budget chunks, `RolloutTrainer.token_budget_micro_batches`): each
chunk's loss is its share of the optimizer step's (`step_share`: grpo and rft divide by the step's
sequences, dr_grpo by sequences × max_completion_length, dapo by the same token normaliser as
without a budget), so the step's gradient is the unbudgeted one for every loss type.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from reasoning.objectives.logprobs import masked_mean
from reasoning.objectives.policy import (
    aggregate_loss,
    clipped_surrogate,
    debiased_accuracy_advantages,
    debiased_accuracy_weights,
    group_advantages,
    informative_groups,
    kl_estimate,
    microbatch_loss,
    off_policy_weights,
    truncated_importance_weights,
    weighted_nll,
)
from reasoning.rollout import Rollout
from reasoning.trainers.base import LossOutput, RolloutTrainer, RolloutTrainerConfig

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
    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "DAPO dynamic sampling: drop the groups whose dynamic_sampling_metric is the same for "
            "every completion (all right or all wrong: zero advantage) and sample more prompts until the "
            "generation holds its full number of groups, all with spread."
        },
    )
    dynamic_sampling_metric: str = field(
        default="correctness",
        metadata={
            "help": "Dynamic sampling: the reward function (named as logged, rewards/<name>/mean) whose raw "
            "values decide whether a group has spread: the task metric, not the weighted total with shaping."
        },
    )
    max_generation_batches: int = field(
        default=10,
        metadata={
            "help": "Dynamic sampling: generation batches one generation may use (the first and its "
            "refills) before training stops with an error; 0 = no limit."
        },
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
        if self.max_staleness and self.tis_cap is not None:
            raise ValueError(
                "tis_cap and is_truncation cap the same weight min(π_old/π_engine, C); with max_staleness > 0 "
                f"set is_truncation (got tis_cap {self.tis_cap}) and leave tis_cap null"
            )
        if self.max_generation_batches < 0:
            raise ValueError(
                f"max_generation_batches must be 0 (no limit) or at least 1, got {self.max_generation_batches}"
            )
        if self.dynamic_sampling and self.loss_type == "rft":
            raise ValueError(
                "dynamic_sampling drops groups whose advantages are all zero, but loss_type rft weights "
                "completions by their reward (a group all right still trains): use loss_type dapo, grpo or "
                "dr_grpo, or turn dynamic_sampling off"
            )
        if self.dynamic_sampling and self.num_generations < 2:
            raise ValueError(
                f"dynamic_sampling keeps groups whose completions differ; num_generations = {self.num_generations} "
                "gives no group any spread: use num_generations >= 2"
            )


class GRPOTrainer(RolloutTrainer):
    """Group-relative policy optimisation on engine rollouts (see the module docstring).

    `ref_model`: the KL reference (default: the frozen starting policy, `RolloutTrainer.frozen_model`).
    """

    config: GRPOConfig
    supports_token_budget = True  # `loss` returns a chunk's share of its step (`step_share`)
    corrects_stale_rollouts = True  # max_staleness > 0: `loss` applies `off_policy_weights`

    def __init__(self, *args: Any, ref_model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference = self.frozen_model(ref_model) if self.config.beta > 0 else None
        self._refill_round = 0  # dynamic sampling: which generation batch of this step is being made
        if self.config.dynamic_sampling:
            # the names the reward metrics are logged under (rewards/<name>/mean)
            names = [
                getattr(function, "__name__", f"reward_{j}") for j, function in enumerate(self.reward_funcs)
            ]
            if self.config.dynamic_sampling_metric not in names:
                raise ValueError(
                    f"dynamic_sampling_metric {self.config.dynamic_sampling_metric!r} is not one of the reward "
                    f"functions {names}: name the one whose raw values are the task metric (e.g. correctness)"
                )
            self.metric_column = names.index(self.config.dynamic_sampling_metric)

    # ------------------------------------------------------------------ dynamic sampling (DAPO)
    def make_batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """`RolloutTrainer.make_batch`, with `dynamic_sampling`: the batch is built from the informative
        groups that `sample_informative` collected (rows replaced by the refill prompts where needed)."""
        if not self.config.dynamic_sampling:
            return super().make_batch(rows)
        rows, groups, rewards = self.sample_informative(rows)
        # the rest as RolloutTrainer.make_batch; the next cycle's prefetch (max_staleness > 0) only after
        # the refills, whose `generate` calls would otherwise take and drop it
        self.prefetch_next_generation()
        batch = self.build_batch(rows, groups, rewards)
        if self.needs_old_logprobs():
            batch["old_logprobs"] = self.logprobs_without_grad(self.model, batch)
        self.log_generation(rows, groups, rewards, batch)
        return batch

    def sample_informative(
        self, rows: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[list[Rollout]], torch.Tensor]:
        """DAPO's dynamic sampling: generate and score `rows`, keep the groups whose raw
        `dynamic_sampling_metric` values differ (`objectives.policy.informative_groups`), and while any
        rank has fewer than `len(rows)` such groups, generate and score another batch of as many prompts
        (`refill_rows`); return the first `len(rows)` kept groups of each rank, in generation order, with
        their rows and reward tables. All ranks make the same number of batches (generation and scoring
        are collectives). Records `dynamic_sampling/dropped_groups` and `.../generated_groups` (all
        ranks, per generation) and `.../refills` (batches after the first)."""
        cfg, want = self.config, len(rows)
        kept_rows: list[dict[str, Any]] = []
        kept_groups: list[list[Rollout]] = []
        kept_tables: list[torch.Tensor] = []
        dropped = generated = 0
        batch_rows = rows
        try:
            while True:
                groups = self.generate(batch_rows)
                table = self.score(batch_rows, groups)
                keep = informative_groups(table[:, self.metric_column], cfg.num_generations)
                for i in keep.nonzero().flatten().tolist():
                    kept_rows.append(batch_rows[i])
                    kept_groups.append(groups[i])
                    kept_tables.append(table[i * cfg.num_generations : (i + 1) * cfg.num_generations])
                counts, _ = self.gather_generation(
                    torch.tensor([[len(kept_rows), len(keep) - int(keep.sum())]])
                )
                dropped += int(counts[:, 1].sum())
                generated += len(keep) * counts.shape[0]
                if int(counts[:, 0].min()) >= want:
                    break
                if cfg.max_generation_batches and self._refill_round + 1 >= cfg.max_generation_batches:
                    raise RuntimeError(
                        f"dynamic sampling: after {self._refill_round + 1} generation batches "
                        f"(max_generation_batches) only {int(counts[:, 0].min())} of the {want} groups a rank "
                        f"needs have a {cfg.dynamic_sampling_metric} that differs within the group ({dropped} of "
                        f"{generated} groups were all alike): the prompts are too easy or too hard for the "
                        "policy. Raise max_generation_batches (0 = no limit), change the data, or turn "
                        "dynamic_sampling off"
                    )
                self._refill_round += 1
                batch_rows = self.refill_rows(want)
        finally:
            refills, self._refill_round = self._refill_round, 0
        self.record("dynamic_sampling/dropped_groups", dropped)
        self.record("dynamic_sampling/generated_groups", generated)
        self.record("dynamic_sampling/refills", refills)
        return kept_rows[:want], kept_groups[:want], torch.cat(kept_tables[:want])

    def refill_rows(self, count: int) -> list[dict[str, Any]]:
        """This rank's `count` prompts of refill batch `_refill_round` of this step: a sample without
        replacement of the training set, seeded by (seed, step, refill), cut by rank as
        `GroupBatchSampler` cuts a generation batch, so a resume draws the same prompts."""
        dataset, world = self.train_dataset, self.args.world_size
        rng = random.Random(f"{self.args.seed}-refill-{self.state.global_step}-{self._refill_round}")
        chosen = rng.sample(range(len(dataset)), count * world)  # GroupBatchSampler ensures count × world fit
        mine = chosen[self.args.process_index * count : (self.args.process_index + 1) * count]
        return [dict(dataset[i]) for i in mine]

    def prompt_seeds(self, count: int, step: int | None = None) -> list[int] | None:
        """`RolloutTrainer.prompt_seeds`, and in a dynamic-sampling refill batch seeds of their own, so that
        a refill's prompts are not sampled with the first batch's seeds (a prompt drawn again would give
        the same completions)."""
        seeds = super().prompt_seeds(count, step)
        if seeds is None or not self._refill_round:
            return seeds
        return [random.Random(f"{seed}-refill-{self._refill_round}").getrandbits(31) for seed in seeds]

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
            batch["advantages"] = debiased_accuracy_advantages(total >= self.config.rft_threshold, size)
        else:
            # on every rank's rewards: `batch` scaling divides by the std of the global batch
            everyone, mine = self.gather_generation(total)
            batch["advantages"] = group_advantages(everyone, size, scale=self.config.scale_rewards)[mine]
        if self.config.mask_truncated_completions:
            batch["completion_mask"] = batch["completion_mask"] * (~batch["truncated"]).unsqueeze(1).long()
        if self.reference is not None:
            batch["ref_logprobs"] = self.reference.logprobs(batch)
        # Global token count of this generation (all ranks): the dapo normaliser.
        tokens = batch["completion_mask"].sum().to(self.accelerator.device)
        batch["generation_tokens"] = self.accelerator.reduce(tokens, reduction="sum").float().cpu()
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        cfg = self.config
        mask = batch["completion_mask"].float()
        logp, entropy = self.policy_logprobs(model, batch, with_entropy=True)
        metrics: dict[str, Any] = {"entropy": masked_mean(entropy.detach(), mask)}
        old = batch.get("old_logprobs")
        old = logp.detach() if old is None else old
        stale = None
        if cfg.max_staleness > 0:  # rollouts of older weights: token-level truncated importance weights
            stale, stats = off_policy_weights(old, batch["engine_logprobs"], cfg.is_truncation, mask)
            metrics.update({f"off_policy/{name}": value for name, value in stats.items()})
        if cfg.loss_type == "rft":
            if stale is not None:
                logp = logp * stale  # each token's log-likelihood gradient reweighted
            if "step_sequences" in batch:  # −(1/B) Σ_i w_i mean_t log π as per-token terms
                per_token = -batch["weights"].to(logp.dtype).unsqueeze(1) * logp
                return LossOutput(self.step_share(per_token, mask, batch, "sequence_mean"), metrics)
            return LossOutput(weighted_nll(logp, mask, batch["weights"]), metrics)
        if "engine_logprobs" in batch:
            metrics["sampling/logp_difference_mean"] = self.engine_mismatch(old, batch)
        per_token, stats = clipped_surrogate(
            logp,
            old,
            batch["advantages"],
            eps_low=cfg.epsilon,
            eps_high=cfg.epsilon_high,
            importance_level=cfg.importance_sampling_level,
            mask=mask,
        )
        metrics.update({f"clip_ratio/{name}": value for name, value in stats.items()})
        if cfg.tis_cap is not None:
            weights = truncated_importance_weights(old, batch["engine_logprobs"], cap=cfg.tis_cap, mask=mask)
            per_token = per_token * weights
        if stale is not None:
            per_token = per_token * stale
        if cfg.beta > 0:
            kl = kl_estimate(logp, batch["ref_logprobs"], kind="k3")
            metrics["kl"] = masked_mean(kl.detach(), mask)
            per_token = per_token + cfg.beta * kl
        if "step_sequences" in batch:  # a token-budget chunk
            return LossOutput(self.step_share(per_token, mask, batch, cfg.loss_type), metrics)
        if cfg.loss_type == "dapo":
            # Each micro-batch's share of the generation's global token count, as TRL does: the loss
            # after accumulation scaling is Σ / (tokens / ranks × accumulation / steps_per_generation).
            accumulation = self.accumulation_steps(model)
            normalizer = batch["generation_tokens"].to(logp.device) / self.accelerator.num_processes
            if model.training:
                normalizer = normalizer * accumulation / self.steps_per_generation
            return LossOutput((per_token * mask).sum() / normalizer.clamp(min=1.0) * accumulation, metrics)
        loss = aggregate_loss(
            per_token, mask, loss_type=cfg.loss_type, max_completion_length=self.sampling.max_tokens
        )
        return LossOutput(loss, metrics)

    def step_share(
        self, per_token: torch.Tensor, mask: torch.Tensor, batch: dict[str, Any], loss_type: str
    ) -> torch.Tensor:
        """A token-budget chunk's share of its optimizer step's loss (`objectives.policy.microbatch_loss`):
        the shares of a step's chunks add up to the loss of the same step without a budget. grpo and
        dr_grpo divide by the step's rows on this rank (`step_sequences`; DDP's gradient average then
        gives the global mean, as per-rank micro-batch means do); dapo by the generation's global token
        count / ranks × accumulation / steps_per_generation, the normaliser of the unbudgeted step (TRL's)."""
        tokens = None
        if loss_type == "dapo":
            tokens = (
                batch["generation_tokens"].to(per_token.device)
                / self.accelerator.num_processes
                * self.args.gradient_accumulation_steps
                / self.steps_per_generation
            )
        return microbatch_loss(
            per_token,
            mask,
            loss_type,
            num_sequences=batch["step_sequences"],
            num_tokens=tokens,
            max_completion_length=self.sampling.max_tokens,
        )
