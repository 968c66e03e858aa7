"""The `reasoning` command: train, eval, demo."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(
    help="Train the reasoning of language models with variational and Bayesian objectives.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    recipe: Path = typer.Argument(
        ..., help="YAML recipe; dotted overrides follow, e.g. --training.max_steps 10"
    ),
) -> None:
    """Run a recipe: train, save the final checkpoint, evaluate."""
    from reasoning.recipes import RecipeError, load_recipe, run

    try:
        parsed = load_recipe(recipe, ctx.args)
        run(parsed, console=console)
    except RecipeError as err:
        _fail(str(err))


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., "--model", help="Checkpoint directory or hub model name."),
    benchmarks: str = typer.Option("gsm8k", help="Comma-separated benchmark names."),
    n: int = typer.Option(1, help="Samples per problem."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    max_tokens: int | None = typer.Option(None, help="Default: each benchmark's own budget."),
    limit: int | None = typer.Option(None, help="At most this many problems per benchmark."),
    engine: str = typer.Option("hf", help="hf, vllm or vllm-server."),
    dtype: str = typer.Option("float32"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(64, help="Prompts per generation call."),
    output_dir: Path | None = typer.Option(None, help="Default: <model>/eval or runs/eval/<model name>."),
) -> None:
    """Evaluate a checkpoint: avg@n, pass@k, maj@n per benchmark; results JSON + samples JSONL."""
    from reasoning.eval.evaluate import evaluate

    if output_dir is None:
        local = Path(model)
        output_dir = local / "eval" if local.is_dir() else Path("runs/eval") / model.replace("/", "--")
    names = [b.strip() for b in benchmarks.split(",") if b.strip()]
    try:
        evaluate(
            model,
            names,
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            limit=limit,
            engine=engine,
            dtype=dtype,
            seed=seed,
            batch_size=batch_size,
            output_dir=output_dir,
            console=console,
        )
    except ValueError as err:
        _fail(str(err))
    console.print(f"results: {output_dir / 'results.json'}; samples: {output_dir / 'samples.jsonl'}")


@app.command()
def demo(
    run_dir: Path = typer.Option(Path("runs/demo"), help="Where checkpoints, metrics and results go."),
) -> None:
    """The embedded default: tiny model -> SFT warm-up on addition -> held-out evaluation."""
    from reasoning.recipes import RecipeError, load_recipe, run

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    recipe_path = RECIPES_DIR / "demo" / "sft.yaml"
    if not recipe_path.exists():
        _fail(f"{recipe_path} not found: run the demo from a source checkout (pip install -e .)")
    try:
        recipe = load_recipe(recipe_path, [f"--training.output_dir={run_dir / 'sft'}", "--eval.before=true"])
        summary = run(recipe, console=console)
    except RecipeError as err:
        _fail(str(err))
    before = summary["before"]["benchmarks"]
    after = summary["after"]["benchmarks"]
    for name in after:
        console.print(
            f"[bold]{name}[/]: greedy accuracy {100 * before[name]['avg@1']:.1f}% (random init) -> "
            f"{100 * after[name]['avg@1']:.1f}% (after SFT warm-up); run directory {run_dir}"
        )


if __name__ == "__main__":
    app()
