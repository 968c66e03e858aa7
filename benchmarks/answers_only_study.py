"""Answers-only supervision: every seed method from one π_θ0, on an embedded task built for its premise.

The setting the variational papers are about: reference traces for a small share of the training
questions (`--traced`, default 5 %), only (question, answer) pairs for the rest. π_θ0 is an SFT of the
tiny model on the traced part (both templates, so every method can read a hint); every row starts
from it, trains with its trainer's demo recipe (`recipes/demo/<trainer>.yaml`) and the same data, and
is evaluated greedily and by avg@k on ≥ 200 held-out questions. The rows in `STUDY_LEARNING_RATES`
keep their demo recipe but for the learning rate, measured on these studies (see the comment there).

Rows (`--only` picks some; every finished row is kept in `<run-dir>/rows/<row>.json` and skipped on
rerun, so a killed study resumes):
- `theta0` (the start), `sft_traced` (SFT on the traced part only), `sft_all` (SFT on every
  question's reference trace: the upper reference, it uses traces the others never see);
- the variational pipeline: `var_acc`, `var_gml`, `var_l` (one round; GML and L reuse Acc's posterior,
  traces, scores and answer samples, as the docs recommend), `var_acc_t2` (two rounds of Algorithm
  1), `var_nohint` (traces from π_θ0: the paper's ablation), `var_online` (the alternating trainer);
- with the task's verifier: `rft`, `rft_debiased`, `grpo`, `grpo_debiased`;
- without any verifier (reward from the reference answer y* only): `covrl_a0.1`, `covrl_a0.5`,
  `covrl_a0.9`, `verifree`, `rlpr`, `jepo`, `nover`, `latro`;
- `gflownet_tb`, `gflownet_msubtb` (verifier reward, diversity: distinct correct solutions) and `dpg`
  (forward KL to p* ∝ π_θ0·1[correct], its KL(p*‖π) estimate logged by the trainer).

Per row: greedy accuracy (`eval` at temperature 0), avg@k / pass@k at temperature 1 (`--k`), distinct
correct answers per question among the k samples (countdown has many), the paired difference in
greedy accuracy to `sft_traced` and to `theta0` with its standard error (same questions), seconds of
wall clock (training + the row's own evaluation excluded) and the samples the row generated.
IWAE bounds of log π_θ0(Y|x) on training questions at K' = 1..K, with q_φ (from `var_acc`) and with
π_θ0 itself as the proposal (from `var_nohint`), go to the results as `iwae`.

    python benchmarks/answers_only_study.py --task countdown --run-dir runs/study-countdown
    python benchmarks/answers_only_study.py --task addition_flawed --run-dir runs/study-addition-flawed
    python benchmarks/answers_only_study.py --task countdown --quick --run-dir /tmp/study-quick

Writes `<run-dir>/results.json`, `<run-dir>/results.md` (the docs table) and `<run-dir>/accuracy.png`.
Run one study at a time with `OMP_NUM_THREADS=1` for comparable seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Task:
    spec: str  # the synthetic task (without n / seed / split / traced)
    benchmark: str  # the held-out benchmark (reasoning.eval.benchmarks)
    answer_max_tokens: int


TASKS = {
    "countdown": Task("countdown?n_numbers=3&max_number=9&max_target=30", "countdown_easy", 16),
    "addition": Task("addition?digits=3", "addition", 8),
    # the traced part was written by a teacher that forgets the carry in 60 % of its solutions; the
    # answers-only part carries true sums (a flawed teacher is one that writes traces)
    "addition_flawed": Task("addition?digits=3&forget_carry=0.6", "addition", 8),
}

VARIATIONAL = ("var_acc", "var_gml", "var_l", "var_acc_t2", "var_nohint", "var_online")
VERIFIER = ("rft", "rft_debiased", "grpo", "grpo_debiased")
NO_VERIFIER = ("covrl_a0.1", "covrl_a0.5", "covrl_a0.9", "verifree", "rlpr", "jepo", "nover", "latro")
DIVERSITY = ("gflownet_tb", "gflownet_msubtb", "dpg")
# Learning rates that differ from the rows' demo recipes, each measured on these studies (docs/covrl.md,
# docs/bayes.md): the CoVRL demo's 1e-5 leaves every likelihood-reward row where π_θ0 was in 60 steps
# (flawed teacher: VeriFree 31.5, JEPO 23.0), 1e-4 moves them (JEPO 38.5, VeriFree 35.5 vs π_θ0 32.0);
# DPG at the bayes demo's 2e-4 drives KL(π‖π_θ0) to 15 nats on addition, 2e-5 keeps it below 0.21.
STUDY_LEARNING_RATES = {**{row: 1e-4 for row in NO_VERIFIER}, "dpg": 2e-5}
ROWS = ("theta0", "sft_traced", "sft_all", *VARIATIONAL, *VERIFIER, *NO_VERIFIER, *DIVERSITY)
# the rows each trainer's docs page shows (with the references every row is compared with)
REFERENCES = ("theta0", "sft_traced", "sft_all")
PAGES = {
    "sft": REFERENCES,
    "variational": (*REFERENCES, *VARIATIONAL),
    "grpo": (*REFERENCES, *VERIFIER),
    "covrl": (*REFERENCES, *NO_VERIFIER),
    "gflownet": (*REFERENCES, "gflownet_tb", "gflownet_msubtb"),
    "bayes": (*REFERENCES, "dpg"),
    "answers_only_study": ROWS,
}
DOCS = REPO / "docs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="countdown")
    parser.add_argument("--run-dir", default=None, help="default: runs/study-<task>")
    parser.add_argument("--quick", action="store_true", help="a few steps of every row (a smoke test)")
    parser.add_argument("--only", default=None, help="comma-separated rows (default: all)")
    parser.add_argument("--traced", type=float, default=0.05, help="share of training questions with a trace")
    parser.add_argument("--train-questions", type=int, default=20000)
    parser.add_argument("--init-steps", type=int, default=400, help="SFT steps of π_θ0 on the traced part")
    parser.add_argument("--sft-steps", type=int, default=150, help="steps of every SFT row and final SFT")
    parser.add_argument("--rl-steps", type=int, default=100, help="steps of every rollout-trainer row")
    parser.add_argument("--var-questions", type=int, default=2000, help="questions the pipeline samples for")
    parser.add_argument("--k", type=int, default=8, help="samples per held-out question for avg@k")
    parser.add_argument("--limit", type=int, default=None, help="held-out questions (default: all, 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--docs",
        action="store_true",
        help="train nothing: copy <run-dir>/results.{json,md} and accuracy.png to docs/studies/answers-only-<task>/ "
        "and rewrite each trainer page's table between <!-- study:<task> --> and <!-- /study --> from them",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.train_questions, args.init_steps, args.sft_steps, args.rl_steps = 600, 6, 4, 2
        args.var_questions, args.k, args.limit = 16, 2, 16
        args.traced = max(args.traced, 0.5)  # so the few sampled questions include traced ones (fallbacks)
    args.run_dir = Path(args.run_dir or f"runs/study-{args.task}").resolve()
    rows = ROWS if args.only is None else tuple(r.strip() for r in args.only.split(",") if r.strip())
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are: {', '.join(ROWS)}")
    args.rows = rows
    return args


# ---------------------------------------------------------------------------------------------- data
def write_data(args: argparse.Namespace) -> dict[str, Path]:
    """answers.jsonl (every question; a trace on the traced share), traced.jsonl (the traced part) and
    all_traces.jsonl (every question with its reference trace, for the upper reference)."""
    from reasoning.data.synthetic import records_from_spec

    folder = args.run_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    task = TASKS[args.task]
    spec = f"{task.spec}&n={args.train_questions}&seed={args.seed}&split=train"
    answers = records_from_spec(f"{spec}&traced={args.traced}")
    full = records_from_spec(spec)
    if args.task == "addition_flawed":  # the upper reference: true traces for every question
        full = records_from_spec(f"addition?digits=3&n={args.train_questions}&seed={args.seed}&split=train")
    files = {
        "answers": (folder / "answers.jsonl", answers),
        "traced": (folder / "traced.jsonl", [r for r in answers if r["traced"]]),
        "all_traces": (folder / "all_traces.jsonl", full),
    }
    for path, records in files.values():
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            os.replace(tmp, path)
    return {name: path for name, (path, _) in files.items()}


# ---------------------------------------------------------------------------------------------- recipes
def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def demo(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "recipes" / "demo" / f"{name}.yaml").read_text())


def common(args: argparse.Namespace, output_dir: Path, steps: int) -> dict[str, Any]:
    task = TASKS[args.task]
    return {
        "eval": {"benchmarks": [task.benchmark], "temperature": 0.0, "n": 1, "limit": args.limit, "before": False},
        "training": {"output_dir": str(output_dir), "max_steps": steps, "save_steps": 10**6, "seed": args.seed},
    }


def recipe_for(row: str, args: argparse.Namespace, data: dict[str, Path], theta0: str) -> dict[str, Any]:
    """The row's recipe: its trainer's demo recipe, π_θ0, the study's data and budget."""
    task = TASKS[args.task]
    out = args.run_dir / row
    start = {"model": {"tiny": None, "path": theta0}}
    heldout = "synthetic:" + task.spec + "&n=200&seed=12345&split=test"
    if row == "init":
        return merged(
            demo("sft"),
            {
                "model": {"tiny": "1m", "path": None},
                "data": {"train": str(data["traced"])},
                "sft": {"both_templates": True},
                **common(args, out, args.init_steps),
            },
        )
    if row in ("sft_traced", "sft_all"):
        source = data["traced"] if row == "sft_traced" else data["all_traces"]
        # lr warm-up and cosine as the demo; Dr. SFT off, as π_θ0 was trained
        return merged(demo("sft"), {**start, "data": {"train": str(source)}, **common(args, out, args.sft_steps)})
    if row in ("var_acc", "var_gml", "var_l", "var_acc_t2", "var_nohint"):
        estimator = {"var_gml": "gml", "var_l": "l"}.get(row, "acc")
        variational = {
            "estimator": estimator,
            "prior_path": theta0,
            "num_questions": args.var_questions,
            "final_steps": args.sft_steps,
            "final_init": "prior",
            "answer_max_tokens": task.answer_max_tokens,
            "heldout": heldout,
            "heldout_questions": min(100, args.limit or 100),
            "rounds": 2 if row == "var_acc_t2" else 1,
            "no_hint": row == "var_nohint",
        }
        if args.quick:
            variational.update(num_traces=2, answer_samples=2, posterior_steps=args.init_steps)
        return merged(
            demo("variational"),
            {"data": {"train": str(data["answers"])}, "variational": variational, **common(args, out, args.sft_steps)},
        )
    rl = {**start, "data": {"train": str(data["answers"])}, **common(args, out, args.rl_steps)}
    if row in STUDY_LEARNING_RATES:
        rl["training"]["learning_rate"] = STUDY_LEARNING_RATES[row]
    if row == "var_online":
        return merged(
            demo("variational_online"),
            {**rl, "variational_online": {"answer_max_tokens": task.answer_max_tokens, "fallback_to_reference": False}},
        )
    if row in VERIFIER:
        grpo = {
            "rft": {"loss_type": "rft"},
            "rft_debiased": {"loss_type": "rft", "accuracy_debiased": True},
            "grpo": {},
            "grpo_debiased": {"scale_rewards": "accuracy"},
        }[row]
        return merged(demo("grpo"), {**rl, "grpo": grpo})
    if row in NO_VERIFIER:
        if row.startswith("covrl_a"):
            covrl = {"reward": "covrl", "alpha": float(row.removeprefix("covrl_a"))}
        else:
            covrl = {"reward": row, "alpha": 1.0}
        # no verifier anywhere in the loss: reward functions only logged are removed too
        return merged(demo("covrl"), {**rl, "reward": {"functions": []}, "covrl": covrl})
    if row in ("gflownet_tb", "gflownet_msubtb"):
        loss = "tb" if row == "gflownet_tb" else "modified_subtb"
        return merged(demo("gflownet"), {**rl, "gflownet": {"loss": loss}})
    if row == "dpg":
        return merged(demo("bayes"), rl)
    raise ValueError(f"no recipe for row {row!r}")


# ---------------------------------------------------------------------------------------------- running
def train(recipe: dict[str, Any], folder: Path) -> float:
    """`reasoning train` on the recipe in a child process; its wall-clock seconds (a rerun resumes)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    log = folder / "study.log"
    start = time.monotonic()
    with log.open("a") as out:
        done = subprocess.run([sys.executable, "-m", "reasoning", "train", str(path)], cwd=REPO, stdout=out, stderr=out)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"training {folder.name} failed (exit {done.returncode}); the end of {log}:\n{tail}")
    return time.monotonic() - start


def evaluate_sampled(args: argparse.Namespace, model: str, out: Path) -> dict[str, Any]:
    """avg@k / pass@k at temperature 1 on the held-out benchmark (vLLM), and per-question samples."""
    task = TASKS[args.task]
    if not (out / "results.json").exists():
        command = [sys.executable, "-m", "reasoning", "eval", "--model", model, "--benchmarks", task.benchmark]
        command += ["--n", str(args.k), "--temperature", "1.0", "--engine", "vllm", "--output-dir", str(out)]
        command += ["--seed", str(args.seed)] + (["--limit", str(args.limit)] if args.limit else [])
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"evaluating {model} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text())


def samples_by_question(path: Path) -> dict[int, list[dict[str, Any]]]:
    grouped: dict[int, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        grouped.setdefault(sample["id"], []).append(sample)
    return grouped


def greedy_correct(folder: Path) -> dict[int, bool]:
    return {q: s[0]["correct"] for q, s in samples_by_question(folder / "samples.jsonl").items()}


def row_samples(row: str, recipe: dict[str, Any], folder: Path) -> int:
    """Completions the row generated in training, from its own logs: for the pipeline every stage's
    traces plus the answers sampled after them (the Acc stage); for rollout trainers the rollouts."""
    if row in ("theta0", "sft_traced", "sft_all"):
        return 0
    if row.startswith("var_") and row != "var_online":
        answers_each = int(recipe["variational"].get("answer_samples", 8))
        total = 0
        for done in folder.rglob("samples/DONE"):
            if row in ("var_gml", "var_l") and done.parent.parent == folder:
                continue  # var_acc's traces and answers, reused (counted in var_acc's row)
            traces = int(json.loads(done.read_text()).get("traces", 0))
            graded = (done.parent.parent / "accuracy" / "DONE").exists()
            total += traces * (1 + (answers_each if graded else 0))
        return total
    training = recipe["training"]
    per_step = training["per_device_train_batch_size"] * training.get("gradient_accumulation_steps", 1)
    if recipe["trainer"] == "variational_online":
        per_step *= 2  # a φ-step's traces from π_θ and a θ-step's from q_φ
    return int(per_step * training["max_steps"])


def paired(a: dict[int, bool], b: dict[int, bool]) -> dict[str, float]:
    """Mean of (a − b) over the questions both answered, and its standard error."""
    diffs = [float(a[q]) - float(b[q]) for q in a if q in b]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    return {"diff": 100 * mean, "se": 100 * math.sqrt(var / n), "n": n}


def distinct_correct_mean(folder: Path) -> float:
    grouped = samples_by_question(folder / "samples.jsonl")
    counts = [len({s["answer"] for s in group if s["correct"]}) for group in grouped.values()]
    return sum(counts) / max(len(counts), 1)


def run_row(row: str, args: argparse.Namespace, data: dict[str, Path], theta0: str) -> dict[str, Any]:
    record_path = args.run_dir / "rows" / f"{row}.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    folder = args.run_dir / row
    seconds = 0.0
    if row == "theta0":
        model, greedy_dir, recipe = theta0, args.run_dir / "init" / "eval" / "final", None
    else:
        recipe = recipe_for(row, args, data, theta0)
        if row in ("var_gml", "var_l"):  # reuse var_acc's posterior, traces, scores and answer samples
            source = args.run_dir / "var_acc"
            if not (source / "accuracy" / "DONE").exists():
                raise RuntimeError(f"{row} reuses var_acc's stages: run var_acc first")
            for stage in ("posterior", "samples", "scores", "accuracy"):
                if not (folder / stage).exists():
                    shutil.copytree(source / stage, folder / stage)
        seconds = train(recipe, folder)
        model, greedy_dir = str(folder / "final"), folder / "eval" / "final"
    sampled = evaluate_sampled(args, model, folder / "eval_sampled")
    bench = TASKS[args.task].benchmark
    greedy = json.loads((greedy_dir / "results.json").read_text())["benchmarks"][bench]
    result = {
        "row": row,
        "greedy": 100 * greedy["avg@1"],
        f"avg@{args.k}": 100 * sampled["benchmarks"][bench][f"avg@{args.k}"],
        f"pass@{args.k}": 100 * sampled["benchmarks"][bench][f"pass@{args.k}"],
        "distinct_correct": distinct_correct_mean(folder / "eval_sampled"),
        "seconds": seconds,
        "samples": row_samples(row, recipe, folder) if recipe else 0,
        "greedy_dir": str(greedy_dir),
    }
    if recipe is not None and row.startswith("var_") and row != "var_online":
        stats = folder / "weights" / "stats.json"
        if stats.exists():
            result["iwae_train"] = json.loads(stats.read_text())["iwae_bound"]
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------------- report
def table(args: argparse.Namespace, results: dict[str, dict[str, Any]], rows: tuple[str, ...] = ROWS) -> str:
    k = args.k
    lines = [
        f"| row | greedy % | vs SFT traced (pts ± se) | vs π_θ0 | avg@{k} % | pass@{k} % | distinct correct | seconds | samples |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row not in results:
            continue
        r = results[row]

        def fmt(p: dict[str, float] | None) -> str:
            return "—" if p is None else f"{p['diff']:+.1f} ± {p['se']:.1f}"

        lines.append(
            f"| {row} | {r['greedy']:.1f} | {fmt(r.get('vs_sft_traced'))} | {fmt(r.get('vs_theta0'))} | "
            f"{r[f'avg@{k}']:.1f} | {r[f'pass@{k}']:.1f} | {r['distinct_correct']:.2f} | {r['seconds']:.0f} | {r['samples']} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if r in results]
    values = [results[r]["greedy"] for r in rows]
    errors = [results[r].get("vs_theta0", {}).get("se", 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(rows)), values, yerr=errors, color="tab:blue")
    ax.set_xticks(range(len(rows)), rows, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("greedy held-out accuracy (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_docs(args: argparse.Namespace) -> list[Path]:
    """Publish a finished study: its results to docs/studies/answers-only-<task>/ and, on every page of
    `PAGES` that has the marker pair, that page's rows as a table (the pages that lack it are listed)."""
    source = args.run_dir / "results.json"
    if not source.exists():
        raise SystemExit(f"--docs: no {source}; run the study into --run-dir first")
    summary = json.loads(source.read_text())
    results, args.k = summary["rows"], summary["settings"]["k"]
    target = DOCS / "studies" / f"answers-only-{args.task.replace('_', '-')}"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "results.md", "accuracy.png"):
        if (args.run_dir / name) != (target / name):
            shutil.copyfile(args.run_dir / name, target / name)
    marker = re.compile(rf"(<!-- study:{args.task} -->\n)(.*?)(<!-- /study -->)", re.DOTALL)
    written, missing = [], []
    for page, rows in PAGES.items():
        path = DOCS / f"{page}.md"
        text = path.read_text()
        if not marker.search(text):
            missing.append(path.name)
            continue
        path.write_text(marker.sub(lambda m, rows=rows: m.group(1) + table(args, results, rows) + m.group(3), text))
        written.append(path)
    if missing:
        print(f"[study] no <!-- study:{args.task} --> marker in: {', '.join(missing)}")
    return written


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.docs:
        for path in write_docs(args):
            print(f"[study] table written: {path}")
        return {}
    args.run_dir.mkdir(parents=True, exist_ok=True)
    data = write_data(args)
    init = args.run_dir / "init"
    if not (init / "final").exists():
        train(recipe_for("init", args, data, ""), init)
    theta0 = str(init / "final")
    results: dict[str, dict[str, Any]] = {}
    for row in args.rows:
        print(f"[study] {row}", flush=True)
        results[row] = run_row(row, args, data, theta0)
    for row, result in results.items():
        greedy = greedy_correct(Path(result["greedy_dir"]))
        for other, name in (("sft_traced", "vs_sft_traced"), ("theta0", "vs_theta0")):
            if other in results and other != row:
                result[name] = paired(greedy, greedy_correct(Path(results[other]["greedy_dir"])))
    iwae = {
        "q_phi": results.get("var_acc", {}).get("iwae_train"),
        "pi_theta0": results.get("var_nohint", {}).get("iwae_train"),
    }
    summary = {
        "task": args.task,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "rows"},
        "rows": results,
        "iwae": iwae,
    }
    (args.run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    (args.run_dir / "results.md").write_text(table(args, results))
    plot(results, args.run_dir / "accuracy.png", f"answers-only {args.task}, traced {args.traced:.0%}")
    print(table(args, results))
    return summary


if __name__ == "__main__":
    main()
