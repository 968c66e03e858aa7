"""Recipe run: load the model, tokenizer and data, build the engine and the trainer, train, evaluate,
report.

`run(recipe)` checks the recipe (`reasoning.recipes.checks`), loads what it names, builds the
trainer through its row of `reasoning.recipes.table.TRAINERS`, trains (resuming from the last
complete checkpoint), saves `final/`, evaluates on the `eval:` benchmarks and writes the summary and
the report. Nothing here depends on which trainer runs beyond that row.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
import typing
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
from transformers.integrations import deepspeed as hf_deepspeed

from reasoning.data.datasets import DataError, load_records
from reasoning.eval.evaluate import evaluate
from reasoning.models.latent_thought import build_latent_thought_checkpoint
from reasoning.models.lora import apply_lora, lora_rank
from reasoning.models.tiny import build_tiny_model
from reasoning.recipes.checks import (
    check_eval_lengths,
    check_prompt_lengths,
    check_recipe,
    check_rollout_length_for_evaluation,
    reward_functions,
)
from reasoning.recipes.schema import ModelConfig, Recipe, RecipeError, build_sampling, training_values
from reasoning.recipes.table import TRAINERS, BuildParts
from reasoning.report import write_report
from reasoning.rollout import make_engine
from reasoning.rollout.hf import HFEngine
from reasoning.trainers.callbacks import JsonlMetricsCallback, attach_run_callbacks
from reasoning.trainers.checkpoint import latest_complete_checkpoint, save_final_model
from reasoning.trainers.checks import check_generation_sizes
from reasoning.trainers.evaluation import step_evaluation


def _build_once(folder: Path, build: typing.Callable[[Path], Any]) -> None:
    """`build(path)` a checkpoint at `folder` unless one is there, safely when several ranks run the
    recipe. With a process group (transformers then writes weights on global rank 0 only) rank 0
    builds while the others wait; without one, ranks may race: each builds into its own folder and
    renames it into place, the first rename wins (same seed, same model) and the others are removed."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not (folder / "config.json").exists() and (not distributed or torch.distributed.get_rank() == 0):
        own = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        # Built whole: under a ZeRO-3 config transformers would partition the new model at construction
        # and save only shards. The config is restored for the real load.
        zero3 = hf_deepspeed._hf_deepspeed_config_weak_ref
        hf_deepspeed.unset_hf_deepspeed_config()
        try:
            build(own)
        finally:
            hf_deepspeed._hf_deepspeed_config_weak_ref = zero3
        try:
            os.rename(own, folder)  # atomic; fails when another rank's folder is already in place
        except OSError:
            shutil.rmtree(own, ignore_errors=True)
    if distributed:
        torch.distributed.barrier()


def load_model_and_tokenizer(config: ModelConfig, run_dir: Path):
    """The recipe's model and tokenizer; a tiny model is built once under `<run_dir>/init`."""
    if config.tiny is not None:
        init = run_dir / "init"
        _build_once(init, lambda folder: build_tiny_model(config.tiny, folder, seed=config.seed))
        path = str(init)
    elif config.latent_thought is not None:
        init = run_dir / "init"
        try:
            _build_once(
                init,
                lambda folder: build_latent_thought_checkpoint(
                    folder, seed=config.seed, **config.latent_thought
                ),
            )
        except ValueError as err:
            raise RecipeError(f"section 'model.latent_thought': {err}") from err
        path = str(init)
    else:
        path = config.path
    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise RecipeError(
            f"model.dtype {config.dtype!r} is not a torch dtype; use float32, bfloat16 or float16"
        )
    try:
        attention = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attention)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # not found locally nor on the hub, or not a model checkpoint
        raise RecipeError(
            f"model.path {path!r} cannot be loaded as a local checkpoint or hub model: {err}"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.lora is not None:
        model = apply_lora(model, config.lora)  # engines load `path` (the base) and sync merged weights
    return model, tokenizer, path


def latest_checkpoint(run_dir: Path) -> str | None:
    """The newest complete `checkpoint-N` directory under `run_dir`, to resume from after a crash
    (one whose save was interrupted has no completion marker and is skipped)."""
    return latest_complete_checkpoint(run_dir)


def load_training_records(recipe: Recipe, args: TrainingArguments):
    """The `data:` section's records, checked: loadable, non-empty, enough for one generation."""
    data = recipe.data
    if data.train is None:
        raise RecipeError("section 'data' needs 'train' (dataset name, file or synthetic:TASK)")
    try:
        records = load_records(data.train, data.columns or None, data.split, data.limit)
    except (DataError, FileNotFoundError) as err:
        raise RecipeError(f"section 'data': {err}") from err
    if "code" in recipe.reward.functions and "tests" not in records.column_names:
        raise RecipeError(
            f"reward function 'code' runs each completion against the test cases in the data column 'tests', "
            f"which {data.train!r} does not have (columns: {', '.join(records.column_names)})"
        )
    if TRAINERS[recipe.trainer].rollout_class is not None:
        _, prompts = check_generation_sizes(
            recipe.method, args.per_device_train_batch_size, args.gradient_accumulation_steps, recipe.trainer
        )
        needed = prompts * args.world_size
        if len(records) < needed:
            raise RecipeError(
                f"data.train {data.train!r} has {len(records)} records but one generation needs {needed} "
                f"prompts (per_device_train_batch_size × steps_per_generation / num_generations × "
                f"{args.world_size} process(es)); add data or lower training.per_device_train_batch_size"
            )
    return records


@contextlib.contextmanager
def _whole_models() -> typing.Iterator[None]:
    """Models loaded in the block are whole, as an evaluation engine needs: under a ZeRO-3 config
    transformers would partition them at construction (`zero.Init`, a collective, which rank 0
    evaluating alone after training would wait on forever). The config is restored afterwards."""
    zero3 = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = zero3


def run(recipe: Recipe, console=None) -> dict[str, Any]:
    """Train as the recipe says; evaluate; return a summary. Resumes from the last checkpoint."""
    console = console or Console(stderr=True)
    args = check_recipe(recipe)  # everything that can be checked before a model is built
    run_dir = Path(args.output_dir)
    final_dir = run_dir / "final"
    records = None if (final_dir / "config.json").exists() else load_training_records(recipe, args)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "trainer": recipe.trainer}
    model, tokenizer, start_path = load_model_and_tokenizer(recipe.model, run_dir)
    rollout_len = None  # the rollout engine's max_model_len need (prompt + generated tokens)
    if records is not None:  # checks that need the tokenizer and the model's context, before any work
        rollout_len = check_prompt_lengths(recipe, records, model, tokenizer)
    eval_len = check_eval_lengths(recipe, model, tokenizer)
    if rollout_len is not None and eval_len is not None and recipe.eval.steps is not None:
        rollout_len = check_rollout_length_for_evaluation(recipe, rollout_len, eval_len)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    def run_eval(path: str, name: str) -> dict[str, Any] | None:
        if not recipe.eval.benchmarks:
            return None
        with _whole_models():
            return evaluate(
                path,
                recipe.eval.benchmarks,
                n=recipe.eval.n,
                temperature=recipe.eval.temperature,
                limit=recipe.eval.limit,
                max_tokens=recipe.eval.max_tokens,
                engine=recipe.eval.engine,
                engine_kwargs=recipe.eval.engine_kwargs or None,
                dtype=recipe.model.dtype,
                output_dir=run_dir / "eval" / name,
                console=console,
            )

    if recipe.eval.before:
        summary["before"] = run_eval(start_path, "before")
    if (final_dir / "config.json").exists():
        console.print(f"[yellow]{final_dir} exists: training already finished, skipping to evaluation")
    elif TRAINERS[recipe.trainer].pipeline:  # stages that train, resume and save final/ themselves
        pipeline = build_trainer(recipe, model, tokenizer, records, args, [], start_path, console=console)
        start = time.monotonic()
        summary["stages"] = pipeline.run()
        summary["train_seconds"] = time.monotonic() - start
    else:
        callbacks = [JsonlMetricsCallback(run_dir / "metrics.jsonl")]
        trainer = build_trainer(
            recipe, model, tokenizer, records, args, callbacks, start_path, max_model_len=rollout_len
        )
        attach_run_callbacks(trainer)  # key metrics in the progress bar; completions to report_to
        if recipe.eval.steps is not None:  # after JsonlMetricsCallback: it rewinds metrics.jsonl first
            trainer.add_callback(step_evaluation(trainer, recipe.eval))
        start = time.monotonic()
        try:
            trainer.train(resume_from_checkpoint=latest_checkpoint(run_dir))
            summary["train_seconds"] = time.monotonic() - start
            save_final_model(trainer, final_dir, tokenizer)  # atomic: final/ appears whole or not at all
        finally:
            engine = getattr(trainer, "engine", None)
            if engine is not None:
                engine.close()
    if not _end_distributed():  # evaluation, summary and report: once, by rank 0
        return summary
    summary["after"] = run_eval(str(final_dir), "final")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_run_report(run_dir, console)
    return summary


def write_run_report(run_dir: Path, console) -> Path | None:
    """`<run_dir>/report.html` (curves, timing, evaluation, completions) and `<run_dir>/plots/*.png`
    at the end of a run, on the main process. A report that cannot be drawn is a warning: the run's
    checkpoints and results are already on disk."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    try:
        path = write_report([run_dir], run_dir / "report.html", plots_dir=run_dir / "plots")
    except Exception as err:  # noqa: BLE001 - a plotting failure must not fail a finished run
        console.print(f"[yellow]warning: no report for {run_dir}: {err}")
        return None
    console.print(f"report: {path}")
    return path


def _end_distributed() -> bool:
    """After training under a multi-process launch: tear the process group down and say whether this
    is rank 0, which alone evaluates and writes the summary (every rank would otherwise evaluate and
    write the same files). Left to interpreter exit, a DeepSpeed run on CPU aborts a rank ("terminate
    called without an active exception"). A world-size-1 group (e.g. an in-process vLLM engine's) is
    left alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            rank = torch.distributed.get_rank()
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            return rank == 0
        return True
    return int(os.environ.get("RANK", "0")) == 0


def build_engine(recipe: Recipe, model, tokenizer, model_path: str, max_model_len: int | None = None):
    """The rollout engine: `hf` wraps the live policy; `vllm` loads the starting checkpoint.

    `max_model_len`: what the rollouts need (`check_prompt_lengths`: longest kept prompt + generated
    tokens). A `vllm` engine gets it unless rollout.engine_kwargs sets its own (without either: the
    model's context); an engine with a smaller `max_model_len` of its own (vLLM servers) is an error,
    since its completions would stop early with finish reason "length".
    """
    config = recipe.rollout
    try:
        if config.engine == "hf":
            return HFEngine(model=model, tokenizer=tokenizer, **config.engine_kwargs)
        kwargs = {"dtype": recipe.model.dtype, **config.engine_kwargs}
        if config.engine == "vllm" and max_model_len is not None:
            kwargs.setdefault("max_model_len", max_model_len)
        if kwargs.get("lora_sync") == "adapter" and recipe.model.lora is not None:
            kwargs.setdefault("max_lora_rank", lora_rank(model))  # vLLM's LoRA layers sized for the adapter
        engine = make_engine(config.engine, model_path, **kwargs)
        limit = getattr(engine, "max_model_len", None)
        if max_model_len is not None and isinstance(limit, int) and limit < max_model_len:
            engine.close()
            raise RecipeError(
                f"the {config.engine} engine's max_model_len is {limit} tokens, but the rollouts need "
                f"{max_model_len} (the longest kept prompt + rollout.max_tokens): completions would stop early "
                f"with finish reason 'length'; serve the model with --max-model-len {max_model_len}, or lower "
                f"rollout.max_tokens or {recipe.trainer}.max_prompt_length"
            )
        return engine
    except TypeError as err:
        raise RecipeError(
            f"section 'rollout': engine_kwargs {sorted(config.engine_kwargs)} are not all accepted by the "
            f"{config.engine!r} engine ({err}); remove the ones it does not take (e.g. vLLM's max_model_len "
            "with engine 'hf': `--rollout.engine_kwargs '{}'`)"
        ) from err
    except ValueError as err:
        raise RecipeError(f"section 'rollout': {err}") from err


def build_trainer(
    recipe: Recipe,
    model,
    tokenizer,
    records,
    args: TrainingArguments,
    callbacks: list,
    model_path: str,
    max_model_len: int | None = None,
    console: Console | None = None,
):
    """What `recipe.trainer` trains, made by its row of `TRAINERS` (a transformers.Trainer, or the
    pipeline of stages of a `pipeline` row); `max_model_len` goes to `build_engine`. A ValueError of the
    trainer's (its checks of the data and settings) becomes a RecipeError naming the trainer."""
    entry = TRAINERS[recipe.trainer]
    parts = BuildParts(
        recipe=recipe,
        model=model,
        tokenizer=tokenizer,
        records=records,
        args=args,
        training=training_values(recipe),
        callbacks=callbacks,
        model_path=model_path,
        reward_funcs=reward_functions(recipe.reward, recipe.rollout.max_tokens),
        sampling=build_sampling(recipe, args.seed) if entry.rollout_class is not None else None,
        engine=functools.partial(build_engine, recipe),
        max_model_len=max_model_len,
        console=console,
    )
    try:
        return entry.build(parts)
    except ValueError as err:
        raise RecipeError(f"trainer {recipe.trainer!r}: {err}") from err
