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
import copy
import inspect
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from reasoning.data.templates import Template, encode, template_for
from reasoning.models.scoring import final_states, states_token_logprobs
from reasoning.rollout import Rollout, RolloutEngine, Sampling
from reasoning.trainers.callbacks import rewind_jsonl
from reasoning.trainers.checkpoint import ResumableTrainer
from reasoning.trainers.nonfinite import NonFiniteLossError as NonFiniteLossError  # re-exported (CLI)
from reasoning.trainers.nonfinite import NonFiniteLossGuard

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
    reward_failures: Literal["raise", "skip"] = field(
        default="raise",
        metadata={
            "help": "What a reward function failure does (it raises, returns NaN/inf, a non-number or the "
            "wrong number of values, or no function gives a sample a reward): 'raise' stops training with "
            "the offending sample shown; 'skip' scores that sample as not applicable for that function "
            "(NaN, summed as 0) and counts it in the metric rewards/failures."
        },
    )
    max_nonfinite_losses: int = field(
        default=3,
        metadata={
            "help": "An optimizer step in which any micro-batch's loss is NaN/inf is skipped whole (no "
            "weight or optimizer-state change; metric train/nonfinite_loss_skipped); training stops with an "
            "error after more than this many skipped steps in a row."
        },
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


# Metrics whose window (and cross-rank) reduction is the maximum rather than the mean.
MAX_METRICS = frozenset({"completions/max_length"})


def is_count_metric(name: str) -> bool:
    """Counts (`rewards/failures`, `rewards/<name>/failures`) are summed over the window and ranks."""
    return name.startswith("rewards/") and name.endswith("failures")


def reduce_metrics(accelerator: Any, metrics: dict[str, list[float]]) -> dict[str, float]:
    """Each metric's mean over the logging window, then over the ranks that recorded it.

    Ranks may record different names (a value is recorded only where it is defined, e.g. a rank
    with no prior-sampled rows in CoVRL), so the per-rank results travel in one all-gather of
    objects: a per-name collective would deadlock, or pair different metrics, when the name sets
    differ. With equal per-rank counts the mean of rank means is the global mean. `MAX_METRICS`
    take the maximum instead, counts (`is_count_metric`) the sum.
    """

    def combine(name: str, values: list[float]) -> float:
        if is_count_metric(name):
            return math.fsum(values)
        return max(values) if name in MAX_METRICS else math.fsum(values) / len(values)

    local = {name: combine(name, values) for name, values in metrics.items() if values}
    if accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    everyone = gather_object([local])
    names = sorted(set().union(*everyone))
    return {name: combine(name, [rank[name] for rank in everyone if name in rank]) for name in names}


def is_peft_model(model: torch.nn.Module) -> bool:
    """A PEFT model: its base is the policy with the adapters disabled."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class RewardFunctionError(RuntimeError):
    """A reward function failed on a sample; the message shows the sample and the options."""


def _reward_name(function: RewardFunction, j: int) -> str:
    return getattr(function, "__name__", f"reward_{j}")


def _call_one(function: RewardFunction, kwargs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(function):
        return asyncio.run(function(**kwargs))
    return function(**kwargs)


def _as_rewards(output: Any, n: int) -> tuple[list[float], dict[int, str], str | None]:
    """A function's output -> (values with NaN for None/failed, {sample: problem}, whole-call problem)."""
    if isinstance(output, BaseException):
        return [math.nan] * n, {}, f"raised {type(output).__name__}: {output}"
    try:
        output = list(output)
    except TypeError:
        return [math.nan] * n, {}, f"returned a {type(output).__name__}, not a list of rewards"
    if len(output) != n:
        return [math.nan] * n, {}, f"returned {len(output)} values for {n} completions"
    values, problems = [], {}
    for i, value in enumerate(output):
        if value is None:  # not applicable (TRL's convention)
            values.append(math.nan)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number, problems[i] = math.nan, f"returned {value!r:.80} (a {type(value).__name__}, not a number)"
        else:
            if not math.isfinite(number):
                number, problems[i] = math.nan, f"returned {number}"
        values.append(number)
    return values, problems, None


def _show_sample(kwargs: dict[str, Any], i: int, n: int) -> str:
    """One sample's prompt, completion and scalar columns, shortened, for an error message."""
    shown = []
    for key, values in kwargs.items():
        if key == "completion_ids" or not isinstance(values, list) or len(values) != n:
            continue
        value = values[i]
        if isinstance(value, str | int | float | bool) or value is None:
            text = repr(value)
            shown.append(f"{key}={text if len(text) <= 160 else text[:157] + '...'}")
    return ", ".join(shown)


def call_reward_functions(
    functions: list[RewardFunction],
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
    on_failure: str = "raise",
    failures: dict[str, int] | None = None,
) -> torch.Tensor:
    """Rewards [N, F] from TRL-style functions `f(prompts, completions, completion_ids, **columns)`.

    Coroutine functions run concurrently; `None` (not applicable) becomes NaN. A failure (the
    function raises, returns NaN/inf, a non-number or the wrong number of values; or every function
    returns None for a sample) raises `RewardFunctionError` showing the offending sample when
    `on_failure` is "raise"; with "skip" the failed entries become NaN and `failures[name]` counts
    the failed samples ("no_reward" for samples no function scored). When a whole call fails, the
    function is called again one sample at a time to find the samples it fails on.
    """
    if on_failure not in ("raise", "skip"):
        raise ValueError(f"reward_failures must be 'raise' or 'skip', got {on_failure!r}")
    n = len(completions)
    kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    results: list[Any] = [None] * len(functions)
    pending = []
    for j, function in enumerate(functions):
        if inspect.iscoroutinefunction(function):
            pending.append((j, function))
        else:
            try:
                results[j] = function(**kwargs)
            except Exception as err:  # a user's reward function: any failure is reported below
                results[j] = err

    async def run_async() -> list[Any]:
        return await asyncio.gather(*(function(**kwargs) for _, function in pending), return_exceptions=True)

    if pending:
        for (j, _), value in zip(pending, asyncio.run(run_async())):
            results[j] = value

    def sample_kwargs(i: int) -> dict[str, Any]:
        return {k: [v[i]] if isinstance(v, list) and len(v) == n else v for k, v in kwargs.items()}

    def fail(name: str, i: int, problem: str) -> None:
        if on_failure == "raise":
            raise RewardFunctionError(
                f"reward function {name!r} {problem} on sample {i} of {n} ({_show_sample(kwargs, i, n)}). "
                "Fix the function or the data; or set reward_failures: skip in the trainer's recipe section "
                "to score such samples as not applicable and count them (metric rewards/failures)."
            )
        if failures is not None:
            failures[name] = failures.get(name, 0) + 1

    table = torch.full((n, len(functions)), math.nan)
    for j, (function, output) in enumerate(zip(functions, results)):
        name = _reward_name(function, j)
        values, problems, whole = _as_rewards(output, n)
        if whole is not None:
            for i in range(n):  # find the samples it fails on, one call each
                try:
                    one = _call_one(function, sample_kwargs(i))
                except Exception as err:
                    one = err
                value, problem, one_whole = _as_rewards(one, 1)
                values[i] = value[0]
                if one_whole is not None or problem:
                    problems[i] = one_whole or problem[0]
            if not problems:  # every sample passes alone: the batch call itself is broken
                problems = dict.fromkeys(range(n), whole)
                values = [math.nan] * n
        for i in sorted(problems):
            fail(name, i, problems[i])
        table[:, j] = torch.tensor(values, dtype=torch.float32)
    if functions:
        for i in range(n):
            unanswered = all(
                isinstance(out, list | tuple) and len(out) == n and out[i] is None for out in results
            )
            if unanswered:
                if on_failure == "raise":
                    raise RewardFunctionError(
                        f"no reward function scored sample {i} of {n}: all of "
                        f"{[_reward_name(f, j) for j, f in enumerate(functions)]} returned None (not "
                        f"applicable) for ({_show_sample(kwargs, i, n)}). Add a reward function that applies "
                        "to it, or set reward_failures: skip in the trainer's recipe section to score it 0 "
                        "and count it (metric rewards/failures)."
                    )
                if failures is not None:
                    failures["no_reward"] = failures.get("no_reward", 0) + 1
    return table


class RolloutTrainer(NonFiniteLossGuard, ResumableTrainer, Trainer):
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
        self._group_sampler = sampler
        return DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=lambda rows: rows)

    def _run_epoch(self, *args: Any, **kwargs: Any):
        # accelerate forwards `set_epoch` to a batch sampler only through a BatchSamplerShard or a
        # SkipBatchSampler (several processes, or a resume that skips batches): one process would
        # repeat epoch 0's order in every epoch, and a resumed run would not. Set it for every case.
        epoch = kwargs["epoch"] if "epoch" in kwargs else args[1]
        if getattr(self, "_group_sampler", None) is not None:
            self._group_sampler.set_epoch(int(epoch))
        return super()._run_epoch(*args, **kwargs)

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

    def evaluation_engine(self) -> RolloutEngine:
        """The engine with the policy's current weights, lent to an evaluation during training
        (`reasoning.trainers.evaluation`). The next generation syncs again, which also clears the
        prefix cache the evaluation filled, so the training rollouts are those of a run without it."""
        self.sync_engine()
        self._last_sync_step = None
        return self.engine

    def generation_sampling(self) -> Sampling:
        """The sampling settings of this generation (seeded by the step, so a resume repeats it)."""
        seed = None if self.sampling.seed is None else self.sampling.seed + 1000 * self.state.global_step
        seed = None if seed is None else seed + self.args.process_index
        return Sampling(**{**self.sampling.__dict__, "seed": seed})

    def prompt_seeds(self, count: int) -> list[int] | None:
        """One sampling seed per prompt of this rank's generation batch (None when sampling is unseeded).

        Seeded by (seed, step, the prompt's position in the global generation batch): rank r's
        prompts are positions r·prompts_per_generation + i of the same permutation that one process
        with the whole batch takes in order, so a prompt's completions do not depend on the number
        of ranks (the data-parallel equality tests rely on it) and a resume repeats them.
        """
        if self.sampling.seed is None:
            return None
        first = self.args.process_index * self.prompts_per_generation
        return [
            random.Random(f"{self.sampling.seed}-{self.state.global_step}-{first + i}").getrandbits(31)
            for i in range(count)
        ]

    def generate(self, rows: list[dict[str, Any]]) -> list[list[Rollout]]:
        self.sync_engine()
        start = time.monotonic()
        groups = self.engine.generate(
            [row["prompt_ids"] for row in rows],
            self.generation_sampling(),
            n=self.config.num_generations,
            seeds=self.prompt_seeds(len(rows)),
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
        table = self.call_rewards(
            self.reward_funcs,
            [row["prompt"] for row in flat_rows],
            [r.text for r in rollouts],
            [r.completion_ids for r in rollouts],
            columns,
        )
        self._metrics["time/reward"].append(time.monotonic() - start)
        everyone, _ = self.gather_generation(table)  # the reward stds are the global batch's
        for j, function in enumerate(self.reward_funcs):
            name = getattr(function, "__name__", f"reward_{j}")
            values = everyone[:, j]
            values = values[~values.isnan()]
            if len(values):
                self._metrics[f"rewards/{name}/mean"].append(values.mean().item())
                self._metrics[f"rewards/{name}/std"].append(values.std().item() if len(values) > 1 else 0.0)
        return table

    def call_rewards(
        self,
        functions: list[RewardFunction],
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        columns: dict[str, list[Any]],
    ) -> torch.Tensor:
        """`call_reward_functions` with this trainer's `reward_failures` option: every call of reward (or
        feature) functions goes through here. With "skip" the failed samples of the call are added to the
        counts `rewards/failures` and `rewards/<name>/failures` (summed over the logging window and ranks;
        0 when all went well)."""
        failures: dict[str, int] = {}
        table = call_reward_functions(
            functions,
            prompts,
            completions,
            completion_ids,
            columns,
            on_failure=self.config.reward_failures,
            failures=failures,
        )
        if self.config.reward_failures == "skip":
            self.record("rewards/failures", sum(failures.values()))
            for name, count in failures.items():
                self.record(f"rewards/{name}/failures", count)
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

    def policy_copy(self, frozen: bool = True) -> torch.nn.Module:
        """A copy of the policy's transformers model as it is now (a PEFT policy's whole model).

        `frozen`: in eval mode without gradients (a KL reference, a frozen base). Without DeepSpeed
        ZeRO-3 this is a deep copy. Under ZeRO-3 the policy's parameters are partitions, and a deep
        copy would hold empty shards; instead a new model is built from the policy's config and filled
        module by module from the gathered shards (`deepspeed.zero.GatheredParameters`, so the whole
        policy is never gathered at once). A frozen copy is built partitioned (`zero.Init`, through
        transformers' `_from_config`) and wrapped as TRL's `prepare_deepspeed` does: a DeepSpeed
        engine with the training config's ZeRO-3 settings and no optimizer, whose forward gathers the
        parameters. A trainable copy (`frozen=False`) is a full, unpartitioned model for a torch
        optimizer outside DeepSpeed.
        """
        policy = self.accelerator.unwrap_model(self.model)
        plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
        if plugin is None or plugin.zero_stage != 3:
            model = copy.deepcopy(policy)
        else:
            import deepspeed  # only under DeepSpeed (its import initialises an accelerator)

            dtype = next(policy.parameters()).dtype
            # _from_config builds under zero.Init while transformers' ZeRO-3 config is active
            if frozen:
                model = type(policy)._from_config(policy.config, dtype=dtype)
            else:
                model = type(policy)(policy.config).to(dtype)
            for source, target in zip(policy.modules(), model.modules(), strict=True):
                own = source.parameters(recurse=False), target.parameters(recurse=False)
                pairs = list(zip(*own, strict=True))
                if not pairs:
                    continue
                # modifier_rank 0: a partitioned target is re-partitioned from rank 0's full copy on exit
                with deepspeed.zero.GatheredParameters([p for pair in pairs for p in pair], modifier_rank=0):
                    with torch.no_grad():
                        for src, dst in pairs:
                            dst.data.copy_(src.data)
            if frozen:
                config = copy.deepcopy(plugin.deepspeed_config)
                for key in ("optimizer", "scheduler"):
                    config.pop(key, None)
                config["zero_optimization"].pop("offload_optimizer", None)
                model, *_ = deepspeed.initialize(model=model, config=config)
        if frozen:
            model.eval()  # (a DeepSpeed engine's eval() returns None)
            model.requires_grad_(False)
        return model

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

    def gather_generation(self, values: torch.Tensor) -> tuple[torch.Tensor, slice]:
        """Every rank's `values` `[n, ...]` of this generation, concatenated in rank order, and the
        slice that is this rank's.

        Rank order is the order in which one process with the whole generation batch sees the same
        prompts (`GroupBatchSampler`), so a statistic of the gathered tensor (a batch std, a filter
        threshold) is the single-process one. Every rank must call this (it is a collective).
        """
        n = values.shape[0]
        if self.accelerator.num_processes == 1:
            return values, slice(0, n)
        gathered = self.accelerator.gather(values.contiguous().to(self.accelerator.device)).cpu()
        start = self.args.process_index * n
        return gathered, slice(start, start + n)

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
        temperature, from the final hidden states chunk by chunk (no full-vocabulary logits).

        Under DeepSpeed ZeRO-3 the output head's weight is a partition outside the model's forward,
        so the logits come from the forward itself (`logits_to_keep` = completion width + 1): DeepSpeed
        gathers the weight there and reduces its gradient, at the cost of [B, T, V] logits.
        """
        device = next(model.parameters()).device
        prompt_ids, completion_ids = batch["prompt_ids"].to(device), batch["completion_ids"].to(device)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1).to(device)
        width = completion_ids.shape[1]
        temperature = self.sampling.temperature if self.sampling.temperature > 0 else 1.0
        unwrapped = self.accelerator.unwrap_model(model)
        states, head, _ = final_states(model, unwrapped, input_ids, attention, keep=width + 1)
        # position t's state predicts token t+1
        return states_token_logprobs(
            states[:, :-1],
            head,
            completion_ids,
            temperature=temperature,
            chunk_size=self.config.logprob_chunk_size,
            with_entropy=with_entropy,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Calls the subclass's `loss(model, batch)`: the micro-batch objective, scaled for accumulation."""
        if return_outputs:
            raise ValueError("rollout trainers do not return model outputs from compute_loss")
        loss = self.loss(model, inputs)
        return self.skip_nonfinite_loss(model, loss) if model.training else loss

    @property
    def max_nonfinite_losses(self) -> int:
        """`NonFiniteLossGuard`'s limit of skipped optimizer steps in a row, from the config."""
        return self.config.max_nonfinite_losses

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
        averaged = reduce_metrics(self.accelerator, self._metrics)
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
    def checkpoint_state(self) -> dict[str, Any]:
        """The micro-step counter, the subclass's extra state and, when the checkpoint falls inside
        a generation cycle (steps_per_generation > gradient_accumulation_steps or num_iterations > 1),
        the generation buffer: regenerating it on resume would sample at a later step from moved
        weights, so the rest of the cycle would train on a different batch."""
        state = {**super().checkpoint_state(), "micro_step": self._micro_step}
        if self._micro_step % (self.steps_per_generation * self.config.num_iterations):
            state["buffer"] = self._buffer
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        self._micro_step = int(state["micro_step"])
        self._buffer = list(state.get("buffer", []))

    def rewind_logs(self, step: int) -> None:
        """Drop the completions an interrupted attempt logged at or after `step`, where this run
        starts: it generates them again (a buffer restored from the checkpoint was logged before)."""
        if self.is_world_process_zero():
            rewind_jsonl(Path(self.args.output_dir) / "completions.jsonl", lambda r: r.get("step", 0) < step)


def _finite(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
