"""The `reasoning` command: train, eval, demo, report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from reasoning.report import ReportError, write_report

app = typer.Typer(
    help="Train the reasoning of language models with variational and Bayesian objectives.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _fail(message: str, code: int = 2) -> None:
    """One paragraph on stderr (the message is not read as rich markup, nor wrapped), then exit `code`."""
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    recipe: Path = typer.Argument(
        ..., help="YAML recipe; dotted overrides follow, e.g. --training.max_steps 10"
    ),
) -> None:
    """Run a recipe: train, save the final checkpoint, evaluate."""
    from reasoning.recipes import RecipeError, load_recipe, run
    from reasoning.trainers.base import NonFiniteLossError, RewardFunctionError

    try:
        parsed = load_recipe(recipe, ctx.args)
        run(parsed, console=console)
    except RecipeError as err:  # rejected before training: exit 2
        _fail(str(err))
    except (RewardFunctionError, NonFiniteLossError) as err:  # stopped during training (checkpoints kept)
        _fail(f"training stopped: {err}", code=1)


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., "--model", help="Checkpoint directory or hub model name."),
    benchmarks: str = typer.Option("gsm8k", help="Comma-separated benchmark names."),
    n: int = typer.Option(1, help="Samples per problem."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    max_tokens: int | None = typer.Option(
        None,
        help="Token budget of a completion. Default: each benchmark's own (gsm8k 2048, math500 4096, "
        "aime24/amc23 8192, ...). Completions cut by it count in truncated_share (results.json).",
    ),
    limit: int | None = typer.Option(None, help="At most this many problems per benchmark."),
    engine: str = typer.Option("hf", help="hf, vllm or vllm-server."),
    max_model_len: int | None = typer.Option(
        None,
        help="--engine vllm: the engine's context (prompt + completion). Default: the longest prompt of "
        "the benchmarks + the largest budget; a smaller value, or a budget beyond the model's own "
        "context, is an error before any generation.",
    ),
    device: str | None = typer.Option(
        None,
        help="--engine hf (and the --scaling scorer): cpu, cuda, cuda:N. Default: the GPU when there is "
        "one (accelerate's device, else cuda), else cpu.",
    ),
    dtype: str = typer.Option("float32"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(64, help="Prompts per generation call."),
    output_dir: Path | None = typer.Option(None, help="Default: <model>/eval or runs/eval/<model name>."),
    scaling: str | None = typer.Option(
        None,
        help="Inference scaling over --n sampled rationales: bin, bon, majority (comma-separated); "
        "reports each at N = 4, 8, ... up to --n (temperature 1.0 unless --temperature > 0).",
    ),
    benchmark_source: str = typer.Option(
        "local",
        help="local: the benchmark files shipped with the package (or --benchmarks-dir); "
        "hub: download the Hugging Face datasets instead.",
    ),
    benchmarks_dir: Path | None = typer.Option(
        None,
        help="A folder of benchmark JSONL files to read instead of the embedded copy "
        "(default: $REASONING_BENCHMARKS_DIR if set).",
    ),
) -> None:
    """Evaluate a checkpoint: avg@n, pass@k, maj@n per benchmark; results JSON + samples JSONL."""
    from reasoning.eval.benchmarks import BenchmarkUnavailableError
    from reasoning.eval.evaluate import evaluate

    if output_dir is None:
        local = Path(model)
        output_dir = local / "eval" if local.is_dir() else Path("runs/eval") / model.replace("/", "--")
    names = [b.strip() for b in benchmarks.split(",") if b.strip()]
    engine_kwargs = None
    if max_model_len is not None:
        if engine != "vllm":
            _fail(
                f"--max-model-len sizes the context of --engine vllm, not {engine} (vllm-server: start the "
                "servers with --max-model-len; hf: the model's own context applies)"
            )
        engine_kwargs = {"max_model_len": max_model_len}
    common = dict(
        top_p=top_p,
        max_tokens=max_tokens,
        limit=limit,
        engine=engine,
        dtype=dtype,
        seed=seed,
        batch_size=batch_size,
        output_dir=output_dir,
        console=console,
        benchmark_source=benchmark_source,
        benchmarks_dir=benchmarks_dir,
        engine_kwargs=engine_kwargs,
        device=device,
    )
    try:
        if scaling is not None:
            from reasoning.eval.scaling import default_ns, scaling_eval

            if temperature == 0:
                console.print(
                    "--scaling samples rationales: using temperature 1.0 (--temperature 0 is greedy)"
                )
            methods = [m.strip() for m in scaling.split(",") if m.strip()]
            scaling_eval(
                model, names, ns=default_ns(n), methods=methods, temperature=temperature or 1.0, **common
            )
        else:
            evaluate(model, names, n=n, temperature=temperature, **common)
    except (ValueError, BenchmarkUnavailableError) as err:
        _fail(str(err))
    console.print(f"results: {output_dir / 'results.json'}; samples: {output_dir / 'samples.jsonl'}")


# The demo's warm-up imitates a flawed teacher: 60 % of its worked solutions forget every carry.
# SFT copies the flaw; GRPO, rewarded by the verifier (the true sum), unlearns it.
DEMO_WARMUP_DATA = "synthetic:addition?digits=3&forget_carry=0.6&n=60000&seed=0&split=train"


@app.command()
def demo(
    run_dir: Path = typer.Option(Path("runs/demo"), help="Where checkpoints, metrics and results go."),
    rl: bool = typer.Option(
        True,
        help="Run the GRPO stage (vLLM rollouts) after the warm-up (--no-rl: the warm-up alone).",
    ),
) -> None:
    """The embedded default: tiny model -> SFT warm-up on a flawed teacher's solutions -> GRPO with
    colocated vLLM rollouts -> greedy held-out accuracy after each stage."""
    from reasoning.recipes import RecipeError, load_recipe, run

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    warmup = [f"--training.output_dir={run_dir / 'sft'}", "--eval.before=true", f"--data.train={DEMO_WARMUP_DATA}"]
    stages = [("sft", "sft.yaml", warmup)]
    if rl:
        stages.append(
            (
                "grpo",
                "grpo.yaml",
                [
                    f"--training.output_dir={run_dir / 'grpo'}",
                    f"--model.path={run_dir / 'sft' / 'final'}",
                    "--eval.before=false",  # the warm-up's own evaluation is the "before"
                ],
            )
        )
    rows = []
    start = time.monotonic()
    for name, file, overrides in stages:
        recipe_path = RECIPES_DIR / "demo" / file
        if not recipe_path.exists():
            _fail(f"{recipe_path} not found: run the demo from a source checkout (pip install -e .)")
        stage_start = time.monotonic()
        try:
            summary = run(load_recipe(recipe_path, overrides), console=console)
        except RecipeError as err:
            _fail(str(err))
        seconds = time.monotonic() - stage_start
        if summary.get("before"):
            rows.append(("initial model" if name == "sft" else "before " + name, summary["before"], None))
        rows.append((f"after {name}", summary["after"], seconds))
    table = Table(title=f"demo: greedy accuracy on 200 held-out 3-digit additions ({run_dir})")
    for column in ("model", "accuracy", "stage seconds"):
        table.add_column(column, justify="right" if column != "model" else "left")
    record = []
    for label, results, seconds in rows:
        accuracy = results["benchmarks"]["addition"]["avg@1"]
        table.add_row(label, f"{100 * accuracy:.1f}%", "" if seconds is None else f"{seconds:.0f}")
        record.append({"model": label, "accuracy": accuracy, "seconds": seconds})
    console.print(table)
    total = time.monotonic() - start
    console.print(f"total {total:.0f} s; run directory {run_dir}")
    (run_dir / "summary.json").write_text(json.dumps({"stages": record, "seconds": total}, indent=2))
    page = write_report([run_dir / name for name, _, _ in stages], run_dir / "report.html")
    console.print(f"report (curves, evaluation, completions): {page}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(
        ..., help="Run directories (training.output_dir); several are overlaid."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Default: RUN_DIR/report.html for one run, ./report.html for several."
    ),
    max_completions: int = typer.Option(1000, help="Completions shown per completions/samples file."),
) -> None:
    """Write one self-contained HTML page of a run: curves, timing, evaluation tables, completions."""
    if output is None:
        output = run_dirs[0] / "report.html" if len(run_dirs) == 1 else Path("report.html")
    try:
        path = write_report(run_dirs, output, max_completions=max_completions)
    except ReportError as err:
        _fail(str(err))
    console.print(f"report: {path}")


if __name__ == "__main__":
    app()
