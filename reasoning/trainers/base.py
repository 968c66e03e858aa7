"""RolloutTrainer: the loop every on-policy trainer shares, on transformers.Trainer.

One optimizer step = `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size`
completions. Every `steps_per_generation` micro-batches (× `num_iterations` passes) the trainer
takes `prompts_per_generation` prompts, syncs the engine's weights if they changed since the
last sync, samples `num_generations` completions per prompt, scores them with the reward
functions and lets the subclass turn them into a training batch (advantages, weights, ...).
The buffered batch is then consumed micro-batch by micro-batch by `compute_loss`.

Subclasses define `loss(model, batch)` (the micro-batch objective, from `reasoning.objectives`,
scaled for gradient accumulation) and override a few small hooks: `build_batch` (rewards ->
advantages / weights) and optionally `score`.
Groups never straddle ranks: each rank samples its own prompts and keeps their whole group.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from reasoning.data.templates import Template, encode, template_for
from reasoning.objectives.logprobs import token_logprobs_from_hidden
from reasoning.rollout import Rollout, RolloutEngine, Sampling

RewardFunction = Callable[..., list[float | None]]


@dataclass
class RolloutTrainerConfig:
    """Fields every rollout trainer shares (the trainer's recipe section extends these)."""

    num_generations: int = field(
        default=8, metadata={"help": "Completions sampled per prompt (the group size)."}
    )
    steps_per_generation: int | None = field(
        default=None,
        metadata={"help": "Micro-batches served by one generation (default: gradient_accumulation_steps)."},
    )
    num_iterations: int = field(
        default=1, metadata={"help": "Passes over each generated batch (PPO epochs)."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Drop training prompts longer than this many tokens."}
    )
    logprob_chunk_size: int = field(
        default=1024, metadata={"help": "Rows of B×T per chunk when computing log-probs from hidden states."}
    )
    log_completions: bool = field(
        default=True,
        metadata={"help": "Write completions.jsonl with every generation made at a logging step."},
    )


class GroupBatchSampler(Sampler[list[int]]):
    """Yields, per generation cycle, this rank's `prompts_per_rank` prompt indices, `repeats` times.

    Each epoch is a fresh permutation (seed + epoch); the permutation is cut into generation
    batches of `prompts_per_rank × world_size` prompts, and rank r takes the r-th slice, so a
    prompt's whole group is generated and normalised on one rank. Each batch is yielded
    `repeats` times (once per micro-batch it serves), as transformers.Trainer pulls one batch per
    micro-step.
    """

    def __init__(
        self,
        num_prompts: int,
        prompts_per_rank: int,
        repeats: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        per_cycle = prompts_per_rank * world_size
        if num_prompts < per_cycle:
            raise ValueError(
                f"the dataset has {num_prompts} prompts but one generation needs {per_cycle} "
                f"({prompts_per_rank} per rank × {world_size} ranks); add data or lower the batch size"
            )
        self.num_prompts, self.prompts_per_rank, self.repeats = num_prompts, prompts_per_rank, repeats
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.num_prompts // (self.prompts_per_rank * self.world_size)) * self.repeats

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(self.num_prompts))
        random.Random(self.seed + self.epoch).shuffle(order)
        per_cycle = self.prompts_per_rank * self.world_size
        for start in range(0, len(order) - per_cycle + 1, per_cycle):
            mine = order[
                start + self.rank * self.prompts_per_rank : start + (self.rank + 1) * self.prompts_per_rank
            ]
            for _ in range(self.repeats):
                yield mine


def is_peft_model(model: torch.nn.Module) -> bool:
    """A PEFT model: its base is the policy with the adapters disabled."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def call_reward_functions(
    functions: list[RewardFunction],
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
) -> torch.Tensor:
    """Rewards [N, F] from TRL-style functions `f(prompts, completions, completion_ids, **columns)`.

    Coroutine functions run concurrently; `None` (not applicable) becomes NaN.
    """
    kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    results: list[Any] = [None] * len(functions)
    pending = []
    for i, function in enumerate(functions):
        if inspect.iscoroutinefunction(function):
            pending.append((i, function))
        else:
            results[i] = function(**kwargs)

    async def run_async() -> list[Any]:
        return await asyncio.gather(*(function(**kwargs) for _, function in pending))

    if pending:
        for (i, _), value in zip(pending, asyncio.run(run_async())):
            results[i] = value
    table = torch.full((len(completions), len(functions)), math.nan)
    for j, (function, values) in enumerate(zip(functions, results)):
        values = list(values)
        if len(values) != len(completions):
            name = getattr(function, "__name__", repr(function))
            raise ValueError(
                f"reward function {name} returned {len(values)} values for {len(completions)} completions"
            )
        table[:, j] = torch.tensor([math.nan if v is None else float(v) for v in values])
    return table


class RolloutTrainer(Trainer):
    """transformers.Trainer that trains on its own rollouts. See the module docstring."""

    # compute_loss scales for gradient accumulation itself (each trainer's objective decides how).
    loss_is_scaled_for_ga = True
    # trainers whose objective needs no reward function (e.g. likelihood-only ones) set this to False
    needs_rewards = True
    # `policy_logprobs` applies the sampling temperature only; a subclass that also applies top-k /
    # top-p when scoring (so importance ratios stay exact) sets this.
    scores_top_k_top_p = False

    def __init__(
        self,
        model: PreTrainedModel,
        args: TrainingArguments,
        config: RolloutTrainerConfig,
        train_dataset: Dataset,
        processing_class: PreTrainedTokenizerBase,
        reward_funcs: list[RewardFunction],
        engine: RolloutEngine,
        sampling: Sampling,
        reward_weights: list[float] | None = None,
        template: Template | None = None,
        callbacks: list | None = None,
    ) -> None:
        if (sampling.top_k or sampling.top_p < 1) and not self.scores_top_k_top_p:
            raise ValueError(
                f"{type(self).__name__} scores completions with temperature only, but sampling uses "
                f"top_k={sampling.top_k}, top_p={sampling.top_p}: the importance ratios π_θ/π_old would "
                "compare different distributions. Sample with top_k 0 and top_p 1 (the `rollout:` section)."
            )
        self.config = config
        self.engine = engine
        self.sampling = sampling
        self.reward_funcs = list(reward_funcs)
        if not self.reward_funcs and self.needs_rewards:
            raise ValueError("this trainer needs at least one reward function")
        weights = reward_weights if reward_weights is not None else [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"{len(weights)} reward weights for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.template = template or template_for(processing_class)
        self.steps_per_generation = config.steps_per_generation or args.gradient_accumulation_steps
        completions_per_generation = args.per_device_train_batch_size * self.steps_per_generation
        if completions_per_generation % config.num_generations:
            raise ValueError(
                f"one generation makes per_device_train_batch_size × steps_per_generation = "
                f"{args.per_device_train_batch_size} × {self.steps_per_generation} = {completions_per_generation} "
                f"completions, which is not divisible by num_generations = {config.num_generations}; "
                f"choose sizes so that it is (e.g. per_device_train_batch_size a multiple of num_generations)"
            )
        if self.steps_per_generation % args.gradient_accumulation_steps:
            raise ValueError(
                f"steps_per_generation ({self.steps_per_generation}) must be a multiple of "
                f"gradient_accumulation_steps ({args.gradient_accumulation_steps})"
            )
        self.prompts_per_generation = completions_per_generation // config.num_generations
        train_dataset = self._prepare_prompts(train_dataset, processing_class)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            data_collator=lambda rows: rows,
            callbacks=callbacks,
        )
        self._buffer: list[dict[str, Any]] = []
        self._micro_step = 0
        self._last_sync_step: int | None = None
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.sync_count = 0

    # ------------------------------------------------------------------ data
    def _prepare_prompts(self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
        template = self.template

        def add_prompt(row: dict[str, Any]) -> dict[str, Any]:
            text = template.prior_prompt(row["question"], tokenizer)
            return {"prompt": text, "prompt_ids": encode(tokenizer, text)}

        dataset = dataset.map(add_prompt)
        if self.config.max_prompt_length:
            dataset = dataset.filter(lambda row: len(row["prompt_ids"]) <= self.config.max_prompt_length)
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        self._signature_columns = list(self.train_dataset.column_names)

    def get_train_dataloader(self) -> DataLoader:
        sampler = GroupBatchSampler(
            len(self.train_dataset),
            self.prompts_per_generation,
            repeats=self.steps_per_generation * self.config.num_iterations,
            seed=self.args.seed,
            rank=self.args.process_index,
            world_size=self.args.world_size,
        )
        return DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=lambda rows: rows)

    # ------------------------------------------------------------------ generation
    def sync_engine(self) -> None:
        """Push the policy's weights into the engine once per optimizer step that needs them."""
        if self._last_sync_step == self.state.global_step:
            return
        start = time.monotonic()
        self.engine.sync_weights(self.accelerator.unwrap_model(self.model))
        self._last_sync_step = self.state.global_step
        self.sync_count += 1
        self._metrics["time/sync"].append(time.monotonic() - start)

    def generation_sampling(self) -> Sampling:
        """The sampling settings of this generation (seeded by the step, so a resume repeats it)."""
        seed = None if self.sampling.seed is None else self.sampling.seed + 1000 * self.state.global_step
        seed = None if seed is None else seed + self.args.process_index
        return Sampling(**{**self.sampling.__dict__, "seed": seed})

    def generate(self, rows: list[dict[str, Any]]) -> list[list[Rollout]]:
        self.sync_engine()
        start = time.monotonic()
        groups = self.engine.generate(
            [row["prompt_ids"] for row in rows], self.generation_sampling(), n=self.config.num_generations
        )
        self._metrics["time/generation"].append(time.monotonic() - start)
        return groups

    def score(self, rows: list[dict[str, Any]], groups: list[list[Rollout]]) -> torch.Tensor:
        """Rewards [N, F] for the N = prompts × num_generations rollouts, group by group."""
        flat_rows = [row for row, group in zip(rows, groups) for _ in group]
        rollouts = [r for group in groups for r in group]
        columns = {
            key: [row[key] for row in flat_rows]
            for key in flat_rows[0]
            if key not in ("prompt", "prompt_ids")
        }
        columns["trainer_state"] = self.state
        start = time.monotonic()
        table = call_reward_functions(
            self.reward_funcs,
            [row["prompt"] for row in flat_rows],
            [r.text for r in rollouts],
            [r.completion_ids for r in rollouts],
            columns,
        )
        self._metrics["time/reward"].append(time.monotonic() - start)
        for j, function in enumerate(self.reward_funcs):
            name = getattr(function, "__name__", f"reward_{j}")
            values = table[:, j]
            values = values[~values.isnan()]
            if len(values):
                self._metrics[f"rewards/{name}/mean"].append(values.mean().item())
                self._metrics[f"rewards/{name}/std"].append(values.std().item() if len(values) > 1 else 0.0)
        return table

    def combine_rewards(self, table: torch.Tensor) -> torch.Tensor:
        """Weighted sum over reward functions, NaN (not applicable) counted as 0: [N, F] -> [N]."""
        return torch.nansum(table * self.reward_weights.unsqueeze(0), dim=1)

    def collate_rollouts(self, groups: list[list[Rollout]]) -> dict[str, torch.Tensor]:
        """Left-padded prompts and right-padded completions with masks and engine log-probs."""
        rollouts = [r for group in groups for r in group]
        pad = self.processing_class.pad_token_id or 0
        prompt_width = max(len(r.prompt_ids) for r in rollouts)
        completion_width = max(max(len(r.completion_ids) for r in rollouts), 1)
        n = len(rollouts)
        prompt_ids = torch.full((n, prompt_width), pad, dtype=torch.long)
        prompt_mask = torch.zeros((n, prompt_width), dtype=torch.long)
        completion_ids = torch.full((n, completion_width), pad, dtype=torch.long)
        completion_mask = torch.zeros((n, completion_width), dtype=torch.long)
        engine_logprobs = torch.zeros((n, completion_width))
        for i, r in enumerate(rollouts):
            p, c = len(r.prompt_ids), len(r.completion_ids)
            prompt_ids[i, prompt_width - p :] = torch.tensor(r.prompt_ids)
            prompt_mask[i, prompt_width - p :] = 1
            if c:
                completion_ids[i, :c] = torch.tensor(r.completion_ids)
                completion_mask[i, :c] = 1
                engine_logprobs[i, :c] = torch.tensor(r.logprobs[:c])
        truncated = torch.tensor([r.truncated for r in rollouts])
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "engine_logprobs": engine_logprobs,
            "truncated": truncated,
        }

    def build_batch(
        self, rows: list[dict[str, Any]], groups: list[list[Rollout]], rewards: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Hook: the training tensors for one generation (subclasses add advantages or weights)."""
        batch = self.collate_rollouts(groups)
        batch["rewards"] = self.combine_rewards(rewards)
        return batch

    def needs_old_logprobs(self) -> bool:
        """Whether the batch is reused after the policy moves (then π_old must be stored)."""
        return (
            self.config.num_iterations > 1
            or self.steps_per_generation > self.args.gradient_accumulation_steps
        )

    @torch.no_grad()
    def logprobs_without_grad(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token log-probs of the completions under `model`, chunked, no graph kept."""
        logps = []
        step = self.args.per_device_train_batch_size
        for start in range(0, batch["completion_ids"].shape[0], step):
            part = {
                k: v[start : start + step] for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0
            }
            logps.append(self.policy_logprobs(model, part)[0].cpu())
        return torch.cat(logps)

    def _generate_and_buffer(self, rows: list[dict[str, Any]]) -> None:
        groups = self.generate(rows)
        rewards = self.score(rows, groups)
        batch = self.build_batch(rows, groups, rewards)
        if self.needs_old_logprobs():
            batch["old_logprobs"] = self.logprobs_without_grad(self.model, batch)
        self._log_generation(rows, groups, rewards, batch)
        n = batch["completion_ids"].shape[0]
        # Shuffle so that each micro-batch mixes groups (advantages are already computed).
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(self.args.seed + self.state.global_step)
        )
        size = self.args.per_device_train_batch_size
        self._buffer = []
        for start in range(0, n, size):
            index = order[start : start + size]
            self._buffer.append(
                {k: v[index] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
            )

    def _prepare_inputs(self, inputs: Any) -> dict[str, torch.Tensor]:
        if isinstance(inputs, dict):  # already a micro-batch (evaluation or a subclass)
            return super()._prepare_inputs(inputs)
        cycle = self.steps_per_generation * self.config.num_iterations
        if self._micro_step % cycle == 0 or not self._buffer:
            self._generate_and_buffer(inputs)
        micro = self._buffer[self._micro_step % self.steps_per_generation]
        self._micro_step += 1
        device = self.accelerator.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in micro.items()}

    # ------------------------------------------------------------------ loss
    def policy_logprobs(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs (and entropies) of the completion tokens under `model`, at the sampling
        temperature, from the final hidden states chunk by chunk (no full-vocabulary logits)."""
        device = next(model.parameters()).device
        prompt_ids, completion_ids = batch["prompt_ids"].to(device), batch["completion_ids"].to(device)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1).to(device)
        out = model(
            input_ids=input_ids, attention_mask=attention, logits_to_keep=1, output_hidden_states=True
        )
        width = completion_ids.shape[1]
        # position t's hidden state predicts token t+1
        hidden = out.hidden_states[-1][:, -width - 1 : -1]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        temperature = self.sampling.temperature if self.sampling.temperature > 0 else 1.0
        return token_logprobs_from_hidden(
            hidden,
            head.weight,
            completion_ids,
            bias=getattr(head, "bias", None),
            temperature=temperature,
            chunk_size=self.config.logprob_chunk_size,
            with_entropy=with_entropy,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Calls the subclass's `loss(model, batch)`: the micro-batch objective, scaled for accumulation."""
        if return_outputs:
            raise ValueError("rollout trainers do not return model outputs from compute_loss")
        return self.loss(model, inputs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ metrics and logs
    def record(self, name: str, value: float | torch.Tensor) -> None:
        """Add a value to the metric `name`, averaged over the logging window."""
        self._metrics[name].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        averaged = {}
        for name, values in self._metrics.items():
            if values:
                tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
                averaged[name] = self.accelerator.reduce(tensor.mean(), reduction="mean").item()
        self._metrics.clear()
        super().log({**logs, **averaged}, start_time)

    def _log_generation(
        self, rows: list[dict[str, Any]], groups: list[list[Rollout]], rewards: torch.Tensor, batch: dict
    ) -> None:
        mask = batch["completion_mask"].float()
        lengths = mask.sum(dim=1)
        self.record("completions/mean_length", lengths.mean())
        self.record("completions/max_length", lengths.max())
        self.record("completions/truncated_ratio", batch["truncated"].float().mean())
        total = batch["rewards"]
        self.record("reward", total.mean())
        grouped = total.view(-1, self.config.num_generations)
        self.record("reward_std", grouped.std(dim=1).mean() if self.config.num_generations > 1 else 0.0)
        self.record("frac_reward_zero_std", (grouped.std(dim=1) == 0).float().mean())
        if not self.config.log_completions:
            return
        if self.state.global_step % max(int(self.args.logging_steps), 1) or not self.is_world_process_zero():
            return
        path = Path(self.args.output_dir) / "completions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        names = [getattr(f, "__name__", f"reward_{j}") for j, f in enumerate(self.reward_funcs)]
        with path.open("a") as f:
            i = 0
            for row, group in zip(rows, groups):
                for rollout in group:
                    record = {
                        "step": self.state.global_step,
                        "prompt": row["prompt"],
                        "completion": rollout.text,
                        "finish_reason": rollout.finish_reason,
                        "reward": float(total[i]),
                        "rewards": {n: _finite(rewards[i, j]) for j, n in enumerate(names)},
                    }
                    if "advantages" in batch:
                        record["advantage"] = float(batch["advantages"][i])
                    f.write(json.dumps(record) + "\n")
                    i += 1

    # ------------------------------------------------------------------ checkpoints
    def trainer_extra_state(self) -> dict[str, Any]:
        """Hook: state beyond model/optimizer/scheduler/RNG that a resume needs (e.g. replay buffers)."""
        return {}

    def load_trainer_extra_state(self, state: dict[str, Any]) -> None:
        """Hook: restore what `trainer_extra_state` returned."""

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.is_world_process_zero():
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            torch.save(
                {"micro_step": self._micro_step, "extra": self.trainer_extra_state()},
                folder / "rollout_trainer_state.pt",
            )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / "rollout_trainer_state.pt"
        if path.exists():
            state = torch.load(path, weights_only=False)
            self._micro_step = state["micro_step"]
            self.load_trainer_extra_state(state["extra"])


def _finite(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
