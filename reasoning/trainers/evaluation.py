"""Evaluation during training: benchmarks scored every N optimizer steps, without changing the run.

`StepEvaluationCallback` (a `transformers.TrainerCallback`, what a recipe's `eval.steps: N` attaches)
evaluates the current policy at step 0 (a run that starts from scratch), at every step that is a
multiple of N and at the last step: `n` completions per problem of each benchmark, graded, and
logged through `transformers.Trainer.log` as one record at the step they measure:
`eval/<benchmark>/avg@n`, `eval/<benchmark>/pass@k` (k = 1, 2, 4, ... ≤ n, the unbiased estimator),
`eval/<benchmark>/maj@n` (n > 1), `eval/<benchmark>/mean_length` (tokens per completion) and
`time/eval` (seconds of that evaluation). The record reaches
metrics.jsonl, `report_to` and the report like any other.

Engine. A rollout trainer lends its own engine (`RolloutTrainer.evaluation_engine`: weights synced
first); a trainer without one (SFT) is evaluated by transformers `generate` on the live policy
(`HFEngine(model=...)`, no copy). Sampling is the one `reasoning eval` uses (seed `seed + i` for the
batch of 64 problems starting at problem i), so the same problems get the same seeds at every
evaluation (step-to-step differences come from the policy, not from sampling noise) and the last
evaluation equals `reasoning eval` on the saved model with an engine of the same kind.

Not changing the run. The evaluation restores the torch (CPU and CUDA), python and numpy random
states, the train/eval mode of every module of the model, and the control flags of the training
loop; the rollout engine is synced again before the next generation, which clears the prefix cache
the evaluation filled; the data order never depends on it. Trained weights with and without
evaluation are equal bit for bit (tests/integration/test_eval_during_training.py).

Several processes: each rank evaluates every world_size-th batch of 64 problems with its own engine
and the graded rows are gathered (a collective: every rank runs the callback), so the numbers do
not depend on the number of ranks. Every rank generates the same number of times (generation under
ZeRO-3 or with a tensor-parallel engine is itself a collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from reasoning.data.templates import template_for
from reasoning.eval.benchmarks import BENCHMARKS, load_benchmark
from reasoning.eval.evaluate import benchmark_metrics, sample_batches
from reasoning.rollout import RolloutEngine, Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.trainers.callbacks import EVAL_TIME

Graded = tuple[list[bool], list[str | None], list[int]]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block and put back the torch (CPU and every CUDA device), python `random` and numpy
    global random states as they were before it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def preserved_modes(model: torch.nn.Module) -> Iterator[None]:
    """Run the block and put every module of `model` back in the train/eval mode it had (one
    `model.train(flag)` would also flip submodules kept in another mode on purpose)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def grade(name: str, template: Any, record: dict[str, Any], rollouts: list[Any]) -> Graded:
    """One problem's rollouts: correct (the benchmark's grader), extracted answers, lengths in tokens."""
    bench = BENCHMARKS[name]
    return (
        [bool(bench.grade(r.text, record)) for r in rollouts],
        [template.split_completion(r.text)[1] for r in rollouts],
        [len(r.completion_ids) for r in rollouts],
    )


class StepEvaluationCallback(TrainerCallback):
    """Evaluate `trainer`'s policy on `benchmarks` at step 0, every `steps` optimizer steps and at the
    end (see the module docstring). Add it after `JsonlMetricsCallback` (whose `on_train_begin` rewinds
    metrics.jsonl before the step-0 evaluation is written): `trainer.add_callback(callback)`.

    Args:
        trainer: the trainer whose policy is evaluated (a `RolloutTrainer` lends its engine).
        benchmarks: names in `reasoning.eval.benchmarks.BENCHMARKS`.
        steps: evaluate when the global step is a multiple of this.
        n: completions per problem; temperature: 0 = greedy; limit: problems per benchmark (None: all).
        max_tokens: token budget of a completion (None: each benchmark's own, as `reasoning eval`).
        seed: sampling seed of the first batch (as `reasoning eval --seed`).
        batch_size: problems per generation call.
    """

    def __init__(
        self,
        trainer: Trainer,
        benchmarks: list[str],
        steps: int,
        *,
        n: int = 1,
        temperature: float = 0.0,
        limit: int | None = None,
        max_tokens: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
    ) -> None:
        unknown = [b for b in benchmarks if b not in BENCHMARKS]
        if unknown or not benchmarks:
            raise ValueError(
                f"evaluation during training needs benchmarks from {', '.join(sorted(BENCHMARKS))}; "
                f"got {list(benchmarks)}"
            )
        sizes = {"steps": steps, "n": n, "batch_size": batch_size}
        if max_tokens is not None:
            sizes["max_tokens"] = max_tokens
        for key, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"evaluation during training: {key} must be a positive integer, got {value!r}"
                )
        if temperature < 0:
            raise ValueError(f"evaluation during training: temperature must be >= 0, got {temperature}")
        self.trainer = trainer
        self.steps, self.n, self.temperature, self.seed = steps, n, temperature, seed
        self.batch_size, self.max_tokens = batch_size, max_tokens
        # loaded now: a missing benchmark file fails before training starts
        self.records = {name: load_benchmark(name, limit=limit) for name in benchmarks}
        empty = [name for name, records in self.records.items() if not records]
        if empty:
            raise ValueError(
                f"evaluation during training: benchmark(s) {empty} have no problems (limit {limit})"
            )
        self.last_step: int | None = None  # the step of the last evaluation (or where this run started)
        self._own_engine: RolloutEngine | None = None

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        if state.global_step == 0:
            self.evaluate(state, control)
        # a resumed run's first step had its evaluation (if due) before its checkpoint was written
        self.last_step = state.global_step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        # DefaultFlowCallback, first in the list, has already set should_training_stop at max_steps
        if state.global_step % self.steps == 0 or control.should_training_stop:
            self.evaluate(state, control)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        if state.global_step != self.last_step:  # stopped where on_step_end did not see it coming
            self.evaluate(state, control)

    # ------------------------------------------------------------------ evaluation
    def _engine(self) -> RolloutEngine:
        lend = getattr(self.trainer, "evaluation_engine", None)
        if lend is not None:
            return lend()
        if self._own_engine is None:
            policy = self.trainer.accelerator.unwrap_model(self.trainer.model)
            self._own_engine = HFEngine(model=policy, tokenizer=self.trainer.processing_class)
        return self._own_engine

    def scores(self, engine: RolloutEngine) -> dict[str, float]:
        """`eval/<benchmark>/<metric>` of the policy `engine` generates from (every rank must call this)."""
        args = self.trainer.args
        rank, world = args.process_index, args.world_size
        template = template_for(engine.tokenizer)
        metrics: dict[str, float] = {}
        for name, records in self.records.items():
            sampling = Sampling(
                temperature=self.temperature,
                max_tokens=self.max_tokens or BENCHMARKS[name].max_tokens,
                seed=self.seed,
            )
            graded: list[tuple[int, Graded]] = []  # (problem index, its grades)
            starts = range(0, len(records), self.batch_size)
            # Rank r takes batches r, r + world, ...; every rank generates in every round, since generation
            # can be a collective (transformers `generate` under ZeRO-3, a tensor-parallel vLLM engine):
            # a rank without a batch in the last round generates one problem and drops it.
            for number in range(rank, math.ceil(len(starts) / world) * world, world):
                mine = number < len(starts)
                start = starts[number] if mine else 0
                batch = records[start : start + self.batch_size] if mine else records[:1]
                # seeded as `reasoning eval` seeds the batch starting at problem `start`
                seeded = dataclasses.replace(sampling, seed=self.seed + start)
                for rows, _, groups in sample_batches(engine, template, batch, seeded, self.n, len(batch)):
                    if mine:
                        graded += [
                            (start + i, grade(name, template, r, g))
                            for i, (r, g) in enumerate(zip(rows, groups))
                        ]
            if world > 1:
                graded = gather_object(graded)
            graded.sort(key=lambda row: row[0])
            values = benchmark_metrics([g[0] for _, g in graded], [g[1] for _, g in graded])
            lengths = [length for _, g in graded for length in g[2]]
            values["mean_length"] = sum(lengths) / len(lengths)
            metrics.update({f"eval/{name}/{key}": value for key, value in values.items()})
        return metrics

    def evaluate(self, state: TrainerState, control: TrainerControl) -> dict[str, float]:
        """Evaluate now and log the record at `state.global_step`; returns it. `time/eval` is the
        evaluation's own time; the weight sync before it is the trainer's `time/sync`."""
        with preserved_rng(), preserved_modes(self.trainer.model):
            engine = self._engine()
            start = time.monotonic()
            logs = self.scores(engine)
            logs[EVAL_TIME] = time.monotonic() - start
        self.last_step = state.global_step
        # transformers' own `log`: a trainer's override would add (and reset) its averaged training
        # metrics. Logging clears control.should_log, which the training log of this step still needs.
        should_log = control.should_log
        Trainer.log(self.trainer, dict(logs))
        control.should_log = should_log
        return logs


def step_evaluation(trainer: Trainer, config: Any) -> StepEvaluationCallback:
    """The callback a recipe's `eval:` section (`reasoning.recipes.EvalConfig`) asks for with `steps`."""
    return StepEvaluationCallback(
        trainer,
        list(config.benchmarks),
        config.steps,
        n=config.n,
        temperature=config.temperature,
        limit=config.limit,
        max_tokens=config.max_tokens,
    )
