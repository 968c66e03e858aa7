"""RolloutTrainer: the loop every on-policy trainer shares, on transformers.Trainer, and its hooks.

The loop. One optimizer step = `gradient_accumulation_steps` micro-batches of
`per_device_train_batch_size` completions. Every `steps_per_generation` micro-batches (×
`num_iterations` passes) the trainer takes `prompts_per_generation` prompts, syncs the engine's
weights if they changed since the last sync, samples `num_generations` completions per prompt,
scores them with the reward functions and lets the subclass turn them into a training batch
(advantages, weights, ...). The buffered batch is then consumed micro-batch by micro-batch by
`compute_loss`. Groups never straddle ranks: each rank samples its own prompts and keeps their
whole group. With `max_staleness` > 0 (one-step-off rollouts, `trainers.async_rollouts`) the next
generation's rollouts are sampled in a background thread from the current weights while the trainer
trains (`prefetch_next_generation`); `generate` then returns them, and a class whose `loss` corrects
for the older weights (`objectives.policy.off_policy_weights`) sets `corrects_stale_rollouts = True`
(the others refuse `max_staleness` > 0).

The hook contract. A trainer subclasses `RolloutTrainer`, adds its config dataclass (extending
`RolloutTrainerConfig`) and overrides these public hooks, and no private method of the base or of
transformers.Trainer:

- `prompt_columns(row) -> dict`: the columns one dataset row gets before training (default: the
  prior prompt as `prompt` text and `prompt_ids`); rows whose `*prompt_ids` exceed
  `max_prompt_length` are dropped. These columns are not passed to reward functions.
- `generate(rows) -> list[list[Rollout]]`: one group of rollouts per row (default: sync the engine,
  `num_generations` samples of `row["prompt_ids"]`, seeded per prompt).
- `score(rows, groups) -> Tensor [N, F]`: the reward table (default: every reward function on every
  rollout, through `reward_table`).
- `build_batch(rows, groups, rewards) -> dict[str, Tensor]`: the training tensors of one generation
  (default: `collate_rollouts` + the combined rewards); rows laid out group by group.
- `loss(model, batch) -> LossOutput(value, metrics)`: `value` is the micro-batch objective *before*
  gradient-accumulation scaling (a scalar tensor with its graph), `metrics` what to log about it
  (name -> float or tensor). `compute_loss` divides `value` by the accumulation length of the current
  window (`accumulation_steps(model)`: shorter at an epoch end; 1 in evaluation; 1 when the class
  sets `loss_reduction = "sum"`, for objectives whose micro-batch values add up to the step's),
  records the metrics once, and replaces a non-finite loss by a zero-gradient one and skips the
  optimizer step (`nonfinite.NonFiniteLossGuard`).
- Token-budget micro-batches (`max_tokens_per_microbatch`; a class opts in with
  `supports_token_budget = True`): each optimizer step's rows are cut into length-sorted chunks of
  at most that many tokens (trimmed, or packed into one row with `padding_free`), dealt into the
  `gradient_accumulation_steps` micro-steps (`token_budget_micro_batches`); `training_step` runs one
  forward/backward per chunk (DDP: `no_sync` for all but the last). Each chunk carries its step's
  totals (`step_sequences`, `step_tokens`) and `loss` must return the chunk's *share* of the step's
  objective (`objectives.policy.microbatch_loss`), which `compute_loss` does not divide. Refused
  under DeepSpeed.
- Optional: `needs_old_logprobs()` (store π_old when the batch outlives a step), `make_batch(rows)`
  (one whole generation: generate → score → build_batch → old log-probs → generation log; override to
  change the rows, e.g. a replay buffer), `micro_batches(rows)` (the generation cycle's micro-batches:
  by default `make_batch` shuffled and cut to `per_device_train_batch_size`), `trainer_extra_state()`
  / `load_trainer_extra_state(state)` (checkpointed state), `log_generation(...)`.

What the base gives every trainer:

- scoring (`models.scoring`): `policy_logprobs(model, batch, with_entropy)` at the sampling warpers
  (`warpers`; packed chunks too), `logprobs_without_grad(model, batch)` (with a token budget:
  `budget_logprobs`, planned chunks), `no_grad_chunks`, `answer_logprobs`;
- roles (`trainers.roles`): `frozen_model(model=None, kind="auto")` — a frozen reference / base with
  `.logprobs(batch)`, `.answer_logprobs(layouts)` and `.scope()`; `add_side_parameters(name, module,
  lr, ...)` — parameters with their own learning rate, reduced over ranks and checkpointed;
- rewards: `reward_table(rows, completions, completion_ids, functions)` (the one builder of reward
  function arguments), `call_rewards`, `combine_rewards`;
- metrics: `record(name, value)` (the one metric path: a window mean, reduced over ranks when
  logged) and `timed(name)` (a context manager recording `time/<name>`);
- `gather_generation(values)`: every rank's values of this generation, for global statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from accelerate.utils import gather_object
from datasets import Dataset
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from reasoning.data.templates import Template, encode, template_for
from reasoning.models.lora import is_peft_model
from reasoning.models.packing import (
    PackedInputs,
    is_varlen_backend,
    packed_inputs,
    packed_token_logprobs,
    packing_support,
    verify_packing,
)
from reasoning.models.scoring import Warpers, completion_logprobs, no_grad_chunks, pack_completions, unwrap
from reasoning.objectives.logprobs import masked_mean
from reasoning.rollout import Rollout, RolloutEngine, Sampling
from reasoning.trainers.async_rollouts import Request, RolloutPrefetch, launch_offset
from reasoning.trainers.callbacks import rewind_jsonl
from reasoning.trainers.checkpoint import ResumableTrainer
from reasoning.trainers.checks import check_generation_sizes, check_reward_functions
from reasoning.trainers.microbatch import (
    check_token_budget,
    merge_rows,
    plan_microbatches,
    plan_step,
    slice_rows,
)
from reasoning.trainers.nonfinite import NonFiniteLossError as NonFiniteLossError  # re-exported (CLI)
from reasoning.trainers.nonfinite import NonFiniteLossGuard, max_nonfinite_losses_field
from reasoning.trainers.roles import FrozenModel, SideParameters

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
    max_nonfinite_losses: int = max_nonfinite_losses_field()
    max_tokens_per_microbatch: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of one forward/backward pass. Each optimizer step's completions are sorted "
            "by length and cut into chunks of at most this many tokens (rows × padded width, or the packed "
            "row's length), each trimmed to its own longest prompt and completion; every chunk's loss is its "
            "share of the step's, so the gradient is the unbucketed step's. Also sizes the no-grad log-prob "
            "passes (π_old, π_ref). At least the longest training prompt + rollout max_tokens (checked when "
            "the trainer is built). None: micro-batches of per_device_train_batch_size rows padded to the "
            "generation's longest."
        },
    )
    padding_free: bool | Literal["auto"] = field(
        default="auto",
        metadata={
            "help": "With max_tokens_per_microbatch: pack each chunk's sequences into one row (position ids "
            "restarting per sequence, no padding, no attention mask; checked on a probe when the trainer is "
            "built). auto: only with a flash-attention (varlen) backend; eager/sdpa attention pays T² for a "
            "packed row of T tokens, so length-bucketed padded chunks are cheaper there."
        },
    )
    max_staleness: int = field(
        default=0,
        metadata={
            "help": "One-step-off-policy rollouts: sample the next generation in the background while training "
            "on this one, from weights at most this many optimizer steps old (capped at one generation cycle); "
            "the loss corrects with truncated importance weights (is_truncation). 0: synchronous. Trainers "
            "whose loss has no such correction refuse > 0 (reasoning/trainers/async_rollouts.py)."
        },
    )
    is_truncation: float = field(
        default=2.0,
        metadata={
            "help": "With max_staleness > 0: the cap C of the token-level weight min(π_old/π_behaviour, C) that "
            "corrects for sampling with older weights (both under the sampling warpers)."
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
        self._orders: dict[int, list[int]] = {}  # epoch -> its permutation

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def cycles_per_epoch(self) -> int:
        return self.num_prompts // (self.prompts_per_rank * self.world_size)

    def __len__(self) -> int:
        return self.cycles_per_epoch * self.repeats

    def __iter__(self) -> Iterator[list[int]]:
        for cycle in range(self.cycles_per_epoch):
            mine = self.cycle_indices(cycle, self.epoch)
            for _ in range(self.repeats):
                yield mine

    def cycle_indices(self, cycle: int, epoch: int) -> list[int]:
        """This rank's prompt indices of generation cycle `cycle` of `epoch` (what `__iter__` yields then;
        read ahead by one-step-off rollouts)."""
        if epoch not in self._orders:
            order = list(range(self.num_prompts))
            random.Random(self.seed + epoch).shuffle(order)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # this epoch and the last
            self._orders[epoch] = order
        order = self._orders[epoch]
        start = cycle * self.prompts_per_rank * self.world_size + self.rank * self.prompts_per_rank
        return order[start : start + self.prompts_per_rank]


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
    everyone = gather_object([local])
    names = sorted(set().union(*everyone))
    return {name: combine(name, [rank[name] for rank in everyone if name in rank]) for name in names}


__all__ = ["LossOutput", "MetricsRecorder", "RolloutTrainer", "RolloutTrainerConfig"]


class MetricsRecorder:
    """The one metric path of every trainer here (a mixin before transformers.Trainer in the bases):
    `record`, `record_mean` and `timed` add values to a logging window, which `log` reduces
    (`reduce_metrics`) and adds to transformers' logs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._metrics: dict[str, list[float]] = defaultdict(list)
        super().__init__(*args, **kwargs)

    def record(self, name: str, value: float | torch.Tensor) -> None:
        """Add a value to the metric `name`, averaged over the logging window (then over the ranks that
        recorded it; `MAX_METRICS` take the maximum, counts the sum). The one metric path."""
        self._metrics[name].append(float(value))

    def record_mean(self, name: str, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
        """Record the mean of `values[where]` without its NaN entries (not applicable); nothing when none
        is left (a metric is recorded only where it is defined)."""
        values = values if where is None else values[where]
        values = values[~torch.isnan(values)]
        if values.numel():
            self.record(name, values.float().mean())

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record the wall-clock seconds of the `with` block as the metric `time/<name>`."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.record(f"time/{name}", time.monotonic() - start)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        averaged = reduce_metrics(self.accelerator, self._metrics)
        self._metrics.clear()
        super().log({**logs, **averaged}, start_time)


@dataclass
class LossOutput:
    """What `RolloutTrainer.loss` returns: the micro-batch objective and what to log about it.

    `value`: a scalar tensor (with its graph) *before* gradient-accumulation scaling, which
    `compute_loss` applies. `metrics`: name -> value (float or tensor, detached or not), recorded
    once per micro-batch through `record` (a window mean, reduced over ranks when logged).
    """

    value: torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


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


class RolloutTrainer(MetricsRecorder, NonFiniteLossGuard, ResumableTrainer, Trainer):
    """transformers.Trainer that trains on its own rollouts. See the module docstring."""

    # compute_loss scales for gradient accumulation itself (each trainer's objective decides how).
    loss_is_scaled_for_ga = True
    # trainers whose objective needs no reward function (e.g. likelihood-only ones) set this to False
    needs_rewards = True
    # `policy_logprobs` applies the sampling temperature only; a subclass that also applies top-k /
    # top-p when scoring (so importance ratios stay exact) sets this.
    scores_top_k_top_p = False
    # "mean": each micro-batch's `loss` value estimates the step's objective (divided by the
    # accumulation length); "sum": the micro-batch values add up to it (not divided)
    loss_reduction: Literal["mean", "sum"] = "mean"
    # a subclass whose `loss` returns each chunk's share of its optimizer step when the batch carries
    # the step totals (`step_sequences`, `step_tokens`) sets this: `max_tokens_per_microbatch` is
    # refused otherwise (a per-chunk mean would weight unequal chunks wrongly)
    supports_token_budget = False
    # a subclass whose `loss` corrects rollouts of older weights (`objectives.policy.off_policy_weights`
    # with `is_truncation`) and that samples through the default `generate` sets this: `max_staleness`
    # > 0 is refused otherwise
    corrects_stale_rollouts = False

    @classmethod
    def check_sampling(cls, config: RolloutTrainerConfig, sampling: Sampling) -> None:
        """Raise a ValueError unless this trainer scores completions with the warpers they were sampled
        with (else importance ratios compare different distributions), and unless it corrects stale
        rollouts when `max_staleness` > 0. Called by the constructor and, before any model is loaded, by
        the recipe checks; a trainer with its own rule extends it."""
        if (sampling.top_k or sampling.top_p < 1) and not cls.scores_top_k_top_p:
            raise ValueError(
                f"{cls.__name__} scores completions with temperature only, but sampling uses "
                f"top_k={sampling.top_k}, top_p={sampling.top_p}: the importance ratios π_θ/π_old would "
                "compare different distributions. Sample with top_k 0 and top_p 1 (the `rollout:` section)."
            )
        if config.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 (0: synchronous rollouts), got {config.max_staleness}")
        if not config.is_truncation > 0:
            raise ValueError(f"is_truncation must be > 0 (the importance-weight cap, e.g. 2.0), got {config.is_truncation}")
        if config.max_staleness and (not cls.corrects_stale_rollouts or cls.generate is not RolloutTrainer.generate):
            raise ValueError(
                f"{cls.__name__} has no off-policy correction for rollouts of older weights (or samples "
                f"with its own generate), so max_staleness must be 0, got {config.max_staleness}; "
                "one-step-off rollouts are supported by: grpo"
            )

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
        self.check_sampling(config, sampling)  # before the dataset is mapped
        self.config = config
        self.engine = engine
        self.sampling = sampling
        self.reward_funcs = list(reward_funcs)
        names = [_reward_name(function, j) for j, function in enumerate(self.reward_funcs)]
        check_reward_functions(names, reward_weights, self.needs_rewards)
        weights = reward_weights if reward_weights is not None else [1.0] * len(self.reward_funcs)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.template = template or template_for(processing_class)
        self.steps_per_generation, self.prompts_per_generation = check_generation_sizes(
            config, args.per_device_train_batch_size, args.gradient_accumulation_steps
        )
        self.processing_class = processing_class  # (transformers sets it again) for `prompt_columns`
        self.prompt_column_names: set[str] = set()
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
        self.sync_count = 0
        self.side_parameters: dict[str, SideParameters] = {}
        # one-step-off rollouts (`trainers.async_rollouts`): the next generation sampled ahead
        self.rollout_prefetch = RolloutPrefetch(engine) if config.max_staleness > 0 else None
        self.padding_free = self._check_token_budget()
        # token-budget chunks of the current training micro-step: chunks still to come, and whether an
        # earlier one was non-finite (the guard's all-reduce runs once, on the last chunk)
        self._chunks_left, self._chunk_nonfinite = 0, False

    def _check_token_budget(self) -> bool:
        """Check `max_tokens_per_microbatch` / `padding_free` against this trainer, the data and the
        backend (`microbatch.check_token_budget`); return whether chunks are packed."""
        budget, padding_free = self.config.max_tokens_per_microbatch, self.config.padding_free
        keys = sorted(k for k in self.train_dataset.column_names if k.endswith("prompt_ids"))
        longest = 0
        if budget is not None and keys:
            for rows in self.train_dataset.select_columns(keys).iter(batch_size=1024):
                longest = max([longest, *(len(ids) for key in keys for ids in rows[key])])
        check_token_budget(budget, padding_free, longest, self.sampling.max_tokens)
        if budget is None:
            return False
        name = type(self).__name__
        if not self.supports_token_budget:
            raise ValueError(
                f"{name} does not support max_tokens_per_microbatch: its loss is not written as each chunk's "
                "share of the optimizer step (GRPOTrainer's is); leave max_tokens_per_microbatch unset"
            )
        if self.is_deepspeed_enabled:
            raise ValueError(
                "max_tokens_per_microbatch is not supported under DeepSpeed: a training micro-step of several "
                "chunks would need several engine.backward calls per DeepSpeed micro-step; leave it unset "
                "(or train with DDP)"
            )
        model = unwrap(self.model)
        if padding_free == "auto":
            padding_free = is_varlen_backend(model) and packing_support(model) is None
        if padding_free:
            # half-precision logits of a packed and an unpacked pass differ by more than float32's
            dtype = next(model.parameters()).dtype
            try:
                verify_packing(model, atol=1e-4 if dtype in (torch.float32, torch.float64) else 5e-2)
            except (ValueError, RuntimeError) as err:
                raise ValueError(f"padding_free: {err} (set padding_free: false)") from err
        return bool(padding_free)

    # ------------------------------------------------------------------ data
    def prompt_columns(self, row: dict[str, Any]) -> dict[str, Any]:
        """Hook: the columns a dataset row gets before training: the prior prompt as text (`prompt`) and
        token ids (`prompt_ids`). A subclass adds its own (e.g. a posterior prompt) to `super()`'s."""
        text = self.template.prior_prompt(row["question"], self.processing_class)
        return {"prompt": text, "prompt_ids": encode(self.processing_class, text)}

    def _prepare_prompts(self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
        """The dataset with `prompt_columns` added, without rows whose prompts (every `*prompt_ids`
        column) are longer than `max_prompt_length` tokens."""
        if len(dataset):
            self.prompt_column_names |= set(self.prompt_columns(dict(dataset[0])))
        # an explicit fingerprint: `datasets` would otherwise hash the trainer (engine included)
        key = (dataset._fingerprint, type(self).__qualname__, repr(self.config), repr(self.template))
        dataset = dataset.map(self.prompt_columns, new_fingerprint=Hasher.hash(key))
        limit = self.config.max_prompt_length
        if limit:
            keys = sorted(k for k in self.prompt_column_names if k.endswith("prompt_ids"))
            dataset = dataset.filter(lambda row: all(len(row[k]) <= limit for k in keys))
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
        # never while a generation sampled ahead is running (one-step-off rollouts)
        idle = self.rollout_prefetch.idle() if self.rollout_prefetch is not None else contextlib.nullcontext()
        with self.timed("sync"), idle:
            self.engine.sync_weights(self.accelerator.unwrap_model(self.model))
        self._last_sync_step = self.state.global_step
        self.sync_count += 1

    def evaluation_engine(self) -> RolloutEngine:
        """The engine with the policy's current weights, lent to an evaluation during training
        (`reasoning.trainers.evaluation`). The next generation syncs again, which also clears the
        prefix cache the evaluation filled, so the training rollouts are those of a run without it. A
        generation sampled ahead finishes first (it keeps the weights it started with)."""
        if self.rollout_prefetch is not None:
            self.rollout_prefetch.wait()
        self.sync_engine()
        self._last_sync_step = None
        return self.engine

    def generation_sampling(self, step: int | None = None) -> Sampling:
        """The sampling settings of the generation at optimizer step `step` (default: this one), seeded by
        the step, so a resume repeats it."""
        step = self.state.global_step if step is None else step
        seed = None if self.sampling.seed is None else self.sampling.seed + 1000 * step
        seed = None if seed is None else seed + self.args.process_index
        return Sampling(**{**self.sampling.__dict__, "seed": seed})

    def prompt_seeds(self, count: int, step: int | None = None) -> list[int] | None:
        """One sampling seed per prompt of this rank's generation batch at optimizer step `step` (default:
        this one); None when sampling is unseeded.

        Seeded by (seed, step, the prompt's position in the global generation batch): rank r's
        prompts are positions r·prompts_per_generation + i of the same permutation that one process
        with the whole batch takes in order, so a prompt's completions do not depend on the number
        of ranks (the data-parallel equality tests rely on it) and a resume repeats them.
        """
        if self.sampling.seed is None:
            return None
        first = self.args.process_index * self.prompts_per_generation
        step = self.state.global_step if step is None else step
        return [
            random.Random(f"{self.sampling.seed}-{step}-{first + i}").getrandbits(31)
            for i in range(count)
        ]

    def generate(self, rows: list[dict[str, Any]]) -> list[list[Rollout]]:
        """Hook: one group of `num_generations` rollouts per row, from `row["prompt_ids"]`; with
        `max_staleness` > 0 the generation sampled ahead for these rows (`prefetch_next_generation`)."""
        prompts, n = [row["prompt_ids"] for row in rows], self.config.num_generations
        sampling, seeds = self.generation_sampling(), self.prompt_seeds(len(rows))
        if self.rollout_prefetch is not None:
            ahead, waited = self.rollout_prefetch.take(prompts, sampling, n, seeds)
            # staleness: optimizer steps between the weights that sampled and those that train
            if ahead is not None:
                self.record("time/generation", ahead.seconds)  # the engine's time, in the background
                self.record("time/generation_wait", waited)  # what training waited for it
                self.record("sampling/staleness", self.state.global_step - ahead.request.version)
                return ahead.groups
            self.record("sampling/staleness", 0)
        self.sync_engine()
        with self.timed("generation"):
            return self.engine.generate(prompts, sampling, n=n, seeds=seeds)

    def prefetch_next_generation(self) -> None:
        """With `max_staleness` > 0: start sampling the next generation cycle's rollouts in the background
        when it is due (`async_rollouts.launch_offset`), from the current weights, with the seeds of the
        step at which that cycle begins. Called after a cycle's rollouts (`make_batch`) and at the start
        of each optimizer step; the run's last cycle has no successor."""
        prefetch, sampler = self.rollout_prefetch, getattr(self, "_group_sampler", None)
        if prefetch is None or sampler is None:
            return
        cycle = self.steps_per_generation * self.config.num_iterations
        offset = launch_offset(
            self._micro_step, self.args.gradient_accumulation_steps, cycle, self.config.max_staleness
        )
        following = self._micro_step // cycle + 1
        if offset is None or (prefetch.pending is not None and prefetch.pending.cycle == following):
            return
        prefetch.discard()  # one for another cycle was not taken (a subclass sampled otherwise)
        step = self.state.global_step + offset
        if 0 < self.state.max_steps <= step:
            return
        epoch, index = divmod(following, sampler.cycles_per_epoch)
        prompts = [list(self.train_dataset[i]["prompt_ids"]) for i in sampler.cycle_indices(index, epoch)]
        request = Request(
            cycle=following,
            version=self.state.global_step,
            prompt_ids=prompts,
            sampling=self.generation_sampling(step),
            n=self.config.num_generations,
            seeds=self.prompt_seeds(len(prompts), step),
        )
        self.sync_engine()
        prefetch.start(request)

    # ------------------------------------------------------------------ rewards
    def reward_table(
        self,
        rows: list[dict[str, Any]],
        completions: list[str],
        completion_ids: list[list[int]],
        functions: list[RewardFunction] | None = None,
    ) -> torch.Tensor:
        """Rewards `[N, F]` of N completions (text and ids), completion i answering dataset row `rows[i]`:
        each function (default the trainer's reward functions) is called TRL-style as
        `f(prompts, completions, completion_ids, trainer_state, **columns)` with `prompts` the rows'
        `prompt` and `columns` every other column of the rows except those `prompt_columns` added.
        The one builder of reward-function arguments; `call_rewards` handles failures."""
        functions = self.reward_funcs if functions is None else functions
        keys = [key for key in rows[0] if key not in self.prompt_column_names] if rows else []
        columns: dict[str, Any] = {key: [row[key] for row in rows] for key in keys}
        columns["trainer_state"] = self.state
        return self.call_rewards(
            functions, [row["prompt"] for row in rows], completions, completion_ids, columns
        )

    def score(self, rows: list[dict[str, Any]], groups: list[list[Rollout]]) -> torch.Tensor:
        """Hook: rewards `[N, F]` for the N = prompts × num_generations rollouts, group by group, and
        each function's mean and std over the global generation batch."""
        flat_rows = [row for row, group in zip(rows, groups) for _ in group]
        rollouts = [r for group in groups for r in group]
        with self.timed("reward"):
            table = self.reward_table(
                flat_rows, [r.text for r in rollouts], [r.completion_ids for r in rollouts]
            )
        everyone, _ = self.gather_generation(table)  # the reward stds are the global batch's
        for j, function in enumerate(self.reward_funcs):
            name = _reward_name(function, j)
            values = everyone[:, j]
            values = values[~values.isnan()]
            if len(values):
                self.record(f"rewards/{name}/mean", values.mean())
                self.record(f"rewards/{name}/std", values.std() if len(values) > 1 else 0.0)
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

    # ------------------------------------------------------------------ batches
    @property
    def pad_id(self) -> int:
        return self.processing_class.pad_token_id or 0

    def collate_rollouts(self, groups: list[list[Rollout]]) -> dict[str, torch.Tensor]:
        """Left-padded prompts and right-padded completions with masks (`models.scoring.pack_completions`),
        the engine's log-probs of the completion tokens and which completions were truncated."""
        rollouts = [r for group in groups for r in group]
        batch = pack_completions(
            [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], self.pad_id
        )
        batch["engine_logprobs"] = torch.zeros(batch["completion_ids"].shape)
        for i, r in enumerate(rollouts):
            if r.completion_ids:
                batch["engine_logprobs"][i, : len(r.completion_ids)] = torch.tensor(
                    r.logprobs[: len(r.completion_ids)]
                )
        batch["truncated"] = torch.tensor([r.truncated for r in rollouts])
        return batch

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

    # ------------------------------------------------------------------ roles
    def frozen_model(
        self, model: torch.nn.Module | None = None, kind: Literal["auto", "copy", "adapter"] = "auto"
    ) -> FrozenModel:
        """A frozen reference / base model role (`trainers.roles.FrozenModel`, with `.logprobs(batch)`).

        `model` given: that model (put in eval mode, without gradients). Else `kind`: "adapter" — the
        policy with its LoRA adapter disabled (the frozen base, no second copy; needs a PEFT policy);
        "copy" — a copy of the policy as it is now (`policy_copy`: under ZeRO-3 a partitioned inference
        engine); "auto" — the adapter for a PEFT policy, else a copy.
        """
        scorer, rows = (
            (lambda module, part: self.policy_logprobs(module, part)[0]),
            self.args.per_device_train_batch_size,
        )
        if self.config.max_tokens_per_microbatch is not None:  # `budget_logprobs` cuts the whole batch
            scorer, rows = self.budget_logprobs, 2**62
        if model is not None:
            return FrozenModel(model, scorer, rows)
        policy = self.accelerator.unwrap_model(self.model)
        peft = is_peft_model(policy)
        if kind not in ("auto", "copy", "adapter"):
            raise ValueError(f'a frozen model is "auto", "copy" or "adapter", got {kind!r}')
        if kind == "adapter" and not peft:
            raise ValueError("a frozen model with the adapter disabled needs a PEFT (LoRA) policy; use copy")
        if kind == "adapter" or (kind == "auto" and peft):
            return FrozenModel(policy, scorer, rows, adapter=True)
        return FrozenModel(self.policy_copy(frozen=True), scorer, rows)

    def add_side_parameters(self, name: str, module: torch.nn.Module, lr: float, **options: Any) -> SideParameters:
        """Train `module`'s parameters beside the policy at learning rate `lr` (`trainers.roles.SideParameters`,
        whose keyword arguments `options` are: weight_decay, step, optimizer_cls, optimizer_kwargs,
        max_grad_norm, save_module).

        `step="policy"`: stepped with each optimizer step of the policy (following its schedule);
        `step="manual"`: an optimizer of their own (`optimizer_cls`, default AdamW) that the trainer
        steps with `.step()` (gradients averaged over ranks, clipped to `max_grad_norm`). Their state
        is saved in the checkpoints (the module's weights unless `save_module=False`, e.g. when the
        module is the policy itself). The module is moved to the training device. Call from `__init__`.
        """
        if name in self.side_parameters:
            raise ValueError(f"side parameters {name!r} are already registered")
        module.to(self.args.device)
        side = SideParameters(self, name, module, lr, **options)
        self.side_parameters[name] = side
        if self.optimizer is not None:  # created already (a late registration)
            side.attach(self.optimizer)
        return side

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """transformers' optimizer (with the non-finite guard) and the side parameters stepped with it."""
        optimizer = super().create_optimizer(model)
        for side in self.side_parameters.values():
            side.attach(optimizer)
        return optimizer

    # ------------------------------------------------------------------ one generation
    def make_batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Hook: one generation's training tensors: `generate` → `score` → `build_batch`, the old
        log-probs when `needs_old_logprobs`, and the generation's metrics and log."""
        groups = self.generate(rows)
        self.prefetch_next_generation()  # max_staleness > 0: overlaps what follows and the training
        rewards = self.score(rows, groups)
        batch = self.build_batch(rows, groups, rewards)
        if self.needs_old_logprobs():
            batch["old_logprobs"] = self.logprobs_without_grad(self.model, batch)
        self.log_generation(rows, groups, rewards, batch)
        return batch

    def micro_batches(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Hook: the micro-batches of one generation cycle: `make_batch(rows)` shuffled (seeded by the
        step, so each micro-batch mixes groups; advantages are already computed) and cut into
        `per_device_train_batch_size` rows."""
        batch = self.make_batch(rows)
        n = batch["completion_ids"].shape[0]
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(self.args.seed + self.state.global_step)
        )
        size = self.args.per_device_train_batch_size
        if self.config.max_tokens_per_microbatch is not None:
            return self.token_budget_micro_batches(batch, order)
        return [
            {
                k: v[order[start : start + size]] if torch.is_tensor(v) and v.dim() > 0 else v
                for k, v in batch.items()
            }
            for start in range(0, n, size)
        ]

    def token_budget_micro_batches(self, batch: dict[str, Any], order: torch.Tensor) -> list[dict[str, Any]]:
        """`micro_batches` with `max_tokens_per_microbatch`: the shuffled rows `order` are cut into
        optimizer-step shares of `per_device_train_batch_size × gradient_accumulation_steps` rows, as
        without a budget; each share into budget-sized chunks dealt into `gradient_accumulation_steps`
        micro-steps (`microbatch.plan_step`). A micro-step is `{"chunks": [chunk, ...]}`; each chunk
        (`budget_chunk`) carries its step's totals: `step_sequences` (the share's rows on this rank)
        and `step_tokens` (their completion tokens)."""
        budget = self.config.max_tokens_per_microbatch
        accumulation = self.args.gradient_accumulation_steps
        share = self.args.per_device_train_batch_size * accumulation
        prompts = batch["prompt_mask"].sum(dim=1)
        lengths = (prompts + batch["completion_mask"].sum(dim=1)).tolist()
        prompts = prompts.tolist()
        out = []
        for start in range(0, len(order), share):
            rows = order[start : start + share].tolist()
            totals = {
                "step_sequences": len(rows),
                "step_tokens": int(batch["completion_mask"][rows].sum()),
            }
            steps = plan_step(
                [lengths[i] for i in rows],
                budget,
                accumulation,
                prompt_lengths=[prompts[i] for i in rows],
                packed=self.padding_free,
            )
            for chunks in steps:
                parts = [self.budget_chunk(batch, [rows[i] for i in chunk.indices]) for chunk in chunks]
                out.append({"chunks": [{**part, **totals} for part in parts]})
        return out

    def budget_chunk(self, batch: dict[str, Any], rows: list[int], packed: bool | None = None) -> dict[str, Any]:
        """The rows `rows` of a generation batch as one forward pass: trimmed to their own widths
        (`microbatch.slice_rows`) and, when packed (default: `padding_free`), with `packed`, the
        one-row layout (`models.packing.packed_inputs`, as a plain dict so that checkpoints can hold it)."""
        part = slice_rows(batch, rows)
        if self.padding_free if packed is None else packed:
            layout = packed_inputs(
                part["prompt_ids"], part["prompt_mask"], part["completion_ids"], part["completion_mask"]
            )
            part["packed"] = layout._asdict()
        return part

    def _generate_and_buffer(self, rows: list[dict[str, Any]]) -> None:
        self._buffer = self.micro_batches(rows)

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
        self.prefetch_next_generation()
        micro = self._buffer[self._micro_step % self.steps_per_generation]
        self._micro_step += 1
        device = self.accelerator.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in micro.items()}

    # ------------------------------------------------------------------ scoring
    @property
    def warpers(self) -> Warpers:
        """The sampling distribution's warpers that `policy_logprobs` scores with: the temperature, and
        top-k / top-p when the class sets `scores_top_k_top_p` (else sampling with them is refused)."""
        return Warpers.of(self.sampling, top_k_top_p=self.scores_top_k_top_p)

    def policy_logprobs(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs (and entropies) `[B, T]` of the batch's completion tokens under `model`, at
        the sampling warpers (`models.scoring.completion_logprobs`; 0 at padding). A packed chunk (with
        `packed`, see `budget_chunk`) is scored in one packed row (`models.packing.packed_token_logprobs`),
        with the same values and layout."""
        if "packed" in batch:
            layout = batch["packed"]
            layout = layout._asdict() if isinstance(layout, PackedInputs) else layout
            device = next(model.parameters()).device
            layout = PackedInputs(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in layout.items()})
            return packed_token_logprobs(
                model, layout, batch["completion_ids"].to(device), self.warpers, with_entropy,
                self.config.logprob_chunk_size,
            )  # fmt: skip
        return completion_logprobs(model, batch, self.warpers, with_entropy, self.config.logprob_chunk_size)

    def logprobs_without_grad(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`policy_logprobs` of a whole generation without a graph, `per_device_train_batch_size` rows per
        forward (with `max_tokens_per_microbatch`: `budget_logprobs`), on the CPU."""
        if self.config.max_tokens_per_microbatch is not None:
            return self.budget_logprobs(model, batch)
        rows = self.args.per_device_train_batch_size
        return no_grad_chunks(lambda part: self.policy_logprobs(model, part)[0], batch, rows)

    @torch.no_grad()
    def budget_logprobs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`policy_logprobs` `[N, T]` of a whole generation without a graph, in length-sorted chunks of at
        most `max_tokens_per_microbatch` tokens, each trimmed to its own widths (packed when `padding_free`
        and `model`'s backend packs), put back in batch order on the CPU (`microbatch.merge_rows`)."""
        prompts = batch["prompt_mask"].sum(dim=1)
        lengths = (prompts + batch["completion_mask"].sum(dim=1)).tolist()
        packed = self.padding_free and packing_support(unwrap(model)) is None
        plan = plan_microbatches(
            lengths, self.config.max_tokens_per_microbatch, prompt_lengths=prompts.tolist(), packed=packed
        )
        parts = [
            self.policy_logprobs(model, self.budget_chunk(batch, list(micro.indices), packed))[0].cpu()
            for micro in plan
        ]
        width = batch["completion_ids"].shape[1]
        return merge_rows(parts, plan, len(lengths), width) if parts else torch.zeros((0, width))

    def engine_mismatch(self, logprobs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean |log π − log π_engine| over the completion tokens (the metric `sampling/logp_difference_mean`):
        how far the trainer's log-probs `[B, T]` are from those the engine sampled with."""
        engine = batch["engine_logprobs"].to(logprobs.device)
        return masked_mean((logprobs.detach() - engine).abs(), batch["completion_mask"].to(logprobs.device))

    # ------------------------------------------------------------------ loss
    def accumulation_steps(self, model: torch.nn.Module, batch: dict[str, Any] | None = None) -> int:
        """What `compute_loss` divides a micro-batch's objective by: the length of the current
        accumulation window (transformers sets `current_gradient_accumulation_steps`; shorter at an epoch
        end), 1 in evaluation, 1 for `loss_reduction = "sum"`, 1 for a token-budget chunk (`batch` has
        `step_sequences`: its loss is already its share of the optimizer step)."""
        if not model.training or self.loss_reduction == "sum":
            return 1
        if batch is not None and "step_sequences" in batch:
            return 1
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Hook: the micro-batch objective before accumulation scaling, and its metrics."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(model, batch) -> LossOutput")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`loss(model, batch)`: its metrics recorded, its value divided by `accumulation_steps(model)`,
        and while training a non-finite value replaced (`skip_nonfinite_loss`)."""
        if return_outputs:
            raise ValueError("rollout trainers do not return model outputs from compute_loss")
        out = self.loss(model, inputs)
        if not isinstance(out, LossOutput):
            raise TypeError(
                f"{type(self).__name__}.loss must return LossOutput(value, metrics) with the value before "
                f"accumulation scaling, got a {type(out).__name__}"
            )
        for name, value in out.metrics.items():
            self.record(name, value)
        loss = out.value / self.accumulation_steps(model, inputs)
        if not model.training:
            return loss
        if self._chunks_left:  # a chunk before the micro-step's last: no collective here (ranks' counts differ)
            if not torch.isfinite(loss.detach()).all():
                self._chunk_nonfinite = True
                return sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)
            return loss
        if self._chunk_nonfinite:  # the micro-step's last chunk: an earlier one was NaN/inf, skip the step
            loss = loss + float("nan")
        return self.skip_nonfinite_loss(model, loss)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """transformers' training step, once per chunk when a micro-step is token-budget chunks
        (`{"chunks": [...]}`, `token_budget_micro_batches`); returns the summed loss. Under DDP every
        chunk but the last runs in `no_sync`, so gradients are reduced once per micro-step, as without
        chunks."""
        if self.config.max_tokens_per_microbatch is None:
            return super().training_step(model, inputs, num_items_in_batch)
        inputs = self._prepare_inputs(inputs)
        chunks = inputs.get("chunks")
        if chunks is None:
            return super().training_step(model, inputs, num_items_in_batch)
        total = None
        self._chunk_nonfinite = False
        try:
            for k, chunk in enumerate(chunks):
                self._chunks_left = len(chunks) - 1 - k
                with self.accelerator.no_sync(model) if self._chunks_left else contextlib.nullcontext():
                    loss = super().training_step(model, chunk, num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            self._chunks_left, self._chunk_nonfinite = 0, False
        return total

    @property
    def max_nonfinite_losses(self) -> int:
        """`NonFiniteLossGuard`'s limit of skipped optimizer steps in a row, from the config."""
        return self.config.max_nonfinite_losses

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            chunks = inputs.get("chunks", [inputs]) if isinstance(inputs, dict) else [inputs]
            loss = sum(self.compute_loss(model, chunk) for chunk in chunks)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ logs
    def log_generation(
        self, rows: list[dict[str, Any]], groups: list[list[Rollout]], rewards: torch.Tensor, batch: dict
    ) -> None:
        """Hook: a generation's metrics (lengths, truncation, `batch["rewards"]` and their group spread)
        and, at logging steps, its completions in `completions.jsonl` (rank 0)."""
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
        weights, so the rest of the cycle would train on a different batch. For the same reason a
        generation sampled ahead (`max_staleness` > 0) is waited for and saved (`prefetch`)."""
        state = {**super().checkpoint_state(), "micro_step": self._micro_step}
        if self._micro_step % (self.steps_per_generation * self.config.num_iterations):
            state["buffer"] = self._buffer
        if self.rollout_prefetch is not None:
            state["prefetch"] = self.rollout_prefetch.state_dict()
        if self.side_parameters:
            state["side"] = {name: side.state_dict() for name, side in self.side_parameters.items()}
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        self._micro_step = int(state["micro_step"])
        self._buffer = list(state.get("buffer", []))
        if self.rollout_prefetch is not None:  # (one restored for other prompts is dropped when taken)
            self.rollout_prefetch.load_state_dict(state.get("prefetch"))
        for name, side_state in state.get("side", {}).items():
            if name not in self.side_parameters:
                raise ValueError(
                    f"the checkpoint has side parameters {name!r} that this trainer does not register "
                    f"(it has {sorted(self.side_parameters)}); resume with the configuration that saved it"
                )
            self.side_parameters[name].load_state_dict(side_state)

    def train(self, *args: Any, **kwargs: Any):
        """`ResumableTrainer.train`; then a generation still sampled ahead (a run stopped early, or an
        error) is dropped and the background thread stopped."""
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.rollout_prefetch is not None:
                self.rollout_prefetch.close()

    def rewind_logs(self, step: int) -> None:
        """Drop the completions an interrupted attempt logged at or after `step`, where this run
        starts: it generates them again (a buffer restored from the checkpoint was logged before)."""
        if self.is_world_process_zero():
            rewind_jsonl(Path(self.args.output_dir) / "completions.jsonl", lambda r: r.get("step", 0) < step)


def _finite(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
