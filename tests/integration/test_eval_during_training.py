"""Evaluation during training (`eval.steps`): real runs of small recipes with and without it.

What must hold (reasoning/trainers/evaluation.py):
- the trained weights are equal bit for bit with and without evaluation (GRPO with colocated vLLM
  rollouts and with transformers rollouts, SFT), and so are the logged training metrics;
- metrics.jsonl has one evaluation record at step 0, at every multiple of eval.steps and at the last
  step, with avg@n, pass@1..n, maj@n per benchmark and time/eval; they also reach report_to;
- the evaluations use the current weights: with the same engine kind, the one at step 0 equals the
  `eval.before` evaluation of the starting checkpoint and the last one the evaluation of `final/`;
- a resumed run repeats the evaluations after its checkpoint once (metrics.jsonl as uninterrupted);
- trainers that cannot take it (the variational pipeline, latent thought) are recipe errors.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

from reasoning.recipes import RecipeError, check_recipe, latest_checkpoint, load_recipe, parse_recipe, run
from reasoning.trainers.callbacks import MetricsProgressCallback, evaluation_line
from reasoning.trainers.evaluation import StepEvaluationCallback, preserved_modes, preserved_rng

ROOT = Path(__file__).resolve().parents[2]
EVAL_KEYS = {"avg@4", "pass@1", "pass@2", "pass@4", "maj@4", "mean_length"}

GRPO = """
trainer: grpo
model: {{path: {model}}}
data: {{train: "synthetic:addition?digits=3&n=64&seed=1&split=train"}}
rollout: {{engine: {engine}, temperature: 1.0, max_tokens: 32, engine_kwargs: {engine_kwargs}}}
reward: {{functions: [correctness, answer_format]}}
grpo: {{num_generations: 4, beta: 0.0}}
eval: {{benchmarks: [addition], n: 4, temperature: 1.0, limit: 8, engine: {engine}, before: true}}
training:
  output_dir: {output_dir}
  max_steps: 5
  per_device_train_batch_size: 8
  logging_steps: 1
  save_steps: 1
  save_total_limit: 10
  learning_rate: 1.0e-3
  disable_tqdm: true
  report_to: [tensorboard]
  seed: 0
"""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def grpo_recipe(tmp_path: Path, name: str, model: Path, engine: str = "hf", steps: int | None = 2, **extra):
    text = GRPO.format(
        model=model,
        engine=engine,
        engine_kwargs="{max_model_len: 160, cpu_kv_cache_gib: 0.25}" if engine == "vllm" else "{}",
        output_dir=tmp_path / name,
    )
    raw = yaml.safe_load(text)
    if steps is not None:
        raw["eval"]["steps"] = steps
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def evaluation_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "time/eval" in r]


def training_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "time/eval" not in r]


def assert_same_training(reference: Path, evaluated: Path) -> None:
    """Equal final weights (bit for bit), and equal training logs apart from times."""
    ref, got = (
        load_file(reference / "final" / "model.safetensors"),
        load_file(evaluated / "final" / "model.safetensors"),
    )
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref), [k for k in ref if not torch.equal(ref[k], got[k])]
    untimed = [
        [{k: v for k, v in r.items() if not k.startswith(("time", "train_", "total_flos"))} for r in rows]
        for rows in (training_rows(reference), training_rows(evaluated))
    ]
    assert untimed[0] == untimed[1]


def assert_evaluation_rows(run_dir: Path, steps: list[int], benchmark: str = "addition") -> list[dict]:
    rows = evaluation_rows(run_dir)
    assert [r["step"] for r in rows] == steps
    for row in rows:
        assert {k.split("/")[-1] for k in row if k.startswith(f"eval/{benchmark}/")} == EVAL_KEYS, row
        assert row["time/eval"] > 0
        assert 0 <= row[f"eval/{benchmark}/avg@4"] <= row[f"eval/{benchmark}/pass@4"] <= 1
    return rows


def results(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "eval" / name / "results.json").read_text())["benchmarks"]["addition"]


# ------------------------------------------------------------------------------------------ GRPO, hf


@pytest.fixture(scope="module")
def hf_runs(trained_tiny_dir, tmp_path_factory):
    """(without, with eval.steps 2) of a 5-step GRPO recipe with transformers rollouts."""
    base = tmp_path_factory.mktemp("eval-hf")
    plain = run(load_recipe(grpo_recipe(base, "plain", trained_tiny_dir, steps=None)))
    evaluated = run(load_recipe(grpo_recipe(base, "evaluated", trained_tiny_dir)))
    return base, Path(plain["run_dir"]), Path(evaluated["run_dir"])


def test_grpo_hf_evaluation_keeps_the_trajectory_and_uses_current_weights(hf_runs, trained_tiny_dir):
    _, plain, evaluated = hf_runs
    assert_same_training(plain, evaluated)
    moved = load_file(evaluated / "final" / "model.safetensors")
    start = load_file(trained_tiny_dir / "model.safetensors")
    assert max((moved[k] - start[k]).abs().max().item() for k in start) > 1e-4  # it trained
    rows = assert_evaluation_rows(evaluated, [0, 2, 4, 5])
    assert not evaluation_rows(plain)
    # same engine kind and seeds as the before/after evaluations: the same numbers, hence the same weights
    # (the completions' mean length tells them apart when a model this small gets no answer right)
    for row, name in ((rows[0], "before"), (rows[-1], "final")):
        assert {k: row[f"eval/addition/{k}"] for k in EVAL_KEYS} == {
            k: results(evaluated, name)[k] for k in EVAL_KEYS
        }
    lengths = [row["eval/addition/mean_length"] for row in rows]
    assert len(set(lengths)) > 1, lengths  # the evaluations saw the policy move


def test_grpo_hf_evaluation_reaches_tensorboard_and_the_report(hf_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, evaluated = hf_runs
    (events,) = {p.parent for p in (evaluated / "runs").rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    rows = evaluation_rows(evaluated)
    for key in ("eval/addition/avg@4", "eval/addition/maj@4", "time/eval"):
        written = [(e.step, e.value) for e in accumulator.Scalars(f"train/{key}")]
        assert written == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows]
    page = (evaluated / "report.html").read_text()
    assert "<figcaption>Evaluation during training (addition): eval/addition/avg@4" in page
    assert (evaluated / "plots" / "evaluation_during_training_addition.png").exists()
    # the timing table: one row per timed phase, time/eval with its mean cost per call
    mean = sum(r["time/eval"] for r in rows) / len(rows)
    assert f"<td>time/eval</td><td class=num>{len(rows)}</td><td class=num>{mean:.3g}</td>" in page


@pytest.mark.parametrize("kept", [2, 0])
def test_resumed_run_evaluates_each_step_once(hf_runs, trained_tiny_dir, kept):
    """An interrupted run whose last complete checkpoint is `kept` (later ones unfinished, final/ missing;
    0: none, the run starts again from scratch) resumes there: the evaluations it logged after step `kept`
    (at 0: the step-0 one, which it repeats) are dropped and redone, each step once."""
    base, _, evaluated = hf_runs
    name = f"resumed-{kept}"
    resumed = base / name
    shutil.copytree(evaluated, resumed, ignore=shutil.ignore_patterns("runs", "plots", "report.html"))
    for step in range(kept + 1, 6):
        shutil.rmtree(resumed / f"checkpoint-{step}")
    shutil.rmtree(resumed / "final")
    assert latest_checkpoint(resumed) == (str(resumed / f"checkpoint-{kept}") if kept else None)
    run(load_recipe(grpo_recipe(base, name, trained_tiny_dir)))
    assert_same_training(evaluated, resumed)
    shape = [
        (r["step"], "time/eval" in r, "train_runtime" in r) for r in read_jsonl(evaluated / "metrics.jsonl")
    ]
    assert [
        (r["step"], "time/eval" in r, "train_runtime" in r) for r in read_jsonl(resumed / "metrics.jsonl")
    ] == shape
    for ref, got in zip(evaluation_rows(evaluated), evaluation_rows(resumed)):
        assert {k: v for k, v in ref.items() if k.startswith("eval/")} == {
            k: v for k, v in got.items() if k.startswith("eval/")
        }


# ------------------------------------------------------------------------------------------ GRPO, vLLM


@pytest.mark.vllm
@pytest.mark.slow
def test_grpo_vllm_evaluation_keeps_the_trajectory(trained_tiny_dir, tmp_path, run_cli):
    """Colocated vLLM rollouts: the evaluation borrows the engine (weights synced, its prefix cache filled
    with other prompts) between generations; the run must not notice."""
    runs = {}
    for name, steps in (("plain", None), ("evaluated", 2)):
        recipe = grpo_recipe(
            tmp_path, name, trained_tiny_dir, engine="vllm", steps=steps, training__save_steps=100
        )
        result = run_cli("train", str(recipe), timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = tmp_path / name
    assert_same_training(runs["plain"], runs["evaluated"])
    rows = assert_evaluation_rows(runs["evaluated"], [0, 2, 4, 5])
    # a fresh vLLM engine on the starting checkpoint and on final/, same seeds: the same numbers
    for row, name in ((rows[0], "before"), (rows[-1], "final")):
        expected = results(runs["evaluated"], name)
        assert {k: row[f"eval/addition/{k}"] for k in EVAL_KEYS} == {k: expected[k] for k in EVAL_KEYS}, name
    lengths = [row["eval/addition/mean_length"] for row in rows]
    assert len(set(lengths)) > 1, lengths  # the evaluations saw the policy move


# ------------------------------------------------------------------------------------------ SFT


def test_sft_evaluates_the_live_policy_without_changing_it(tmp_path):
    raw = yaml.safe_load((ROOT / "recipes" / "demo" / "sft.yaml").read_text())
    raw["data"]["train"] = "synthetic:addition?digits=2&n=64&seed=0&split=train"
    raw["sft"]["max_length"] = 64
    raw["eval"] = {"benchmarks": ["addition"], "n": 4, "temperature": 1.0, "limit": 6}
    raw["training"].update(
        max_steps=5,
        logging_steps=1,
        save_steps=100,
        warmup_steps=1,
        per_device_train_batch_size=8,
        disable_tqdm=True,
    )
    finals = {}
    for name, steps in (("plain", None), ("evaluated", 3)):
        recipe = {
            **raw,
            "eval": {**raw["eval"], "steps": steps},
            "training": {**raw["training"], "output_dir": str(tmp_path / name)},
        }
        finals[name] = Path(run(parse_recipe(recipe))["run_dir"])
    assert_same_training(finals["plain"], finals["evaluated"])
    rows = assert_evaluation_rows(finals["evaluated"], [0, 3, 5])
    assert {k: rows[-1][f"eval/addition/{k}"] for k in EVAL_KEYS} == {
        k: results(finals["evaluated"], "final")[k] for k in EVAL_KEYS
    }


# ------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize(
    ("trainer", "eval_section", "message"),
    [
        ("grpo", {"benchmarks": ["addition"], "steps": 0}, "eval.steps must be at least 1"),
        ("grpo", {"steps": 10}, "eval.benchmarks is empty"),
        ("sft", {"benchmarks": ["addition"], "steps": "often"}, "eval.steps must be an integer or null"),
        ("variational", {"benchmarks": ["addition"], "steps": 10}, "trainer 'variational' is a pipeline"),
        ("latent_thought", {"benchmarks": ["addition"], "steps": 10}, "latent_thought.heldout"),
    ],
)
def test_eval_steps_errors_name_the_fix(trainer, eval_section, message):
    raw = yaml.safe_load((ROOT / "recipes" / "demo" / f"{trainer}.yaml").read_text())
    if "path" in raw["model"]:
        raw["model"] = {"tiny": "1m"}
    raw["eval"] = eval_section
    with pytest.raises(RecipeError, match=message):
        check_recipe(parse_recipe(raw))


# ------------------------------------------------------------------------------------------ helpers


def test_preserved_rng_and_modes_put_everything_back():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    model.train()
    model[2].eval()  # a submodule kept in eval mode on purpose stays so
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with preserved_rng(), preserved_modes(model):
        torch.rand(5), random.random(), np.random.rand(4)
        model.eval()
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_evaluation_line_shows_percentages_and_cost_above_the_bar(tmp_path, capsys):
    logs = {
        "eval/addition/avg@4": 0.4125,
        "eval/addition/maj@4": 0.5,
        "eval/addition/mean_length": 27.44,
        "eval/minerva_math/pass@1": 0.5,
        "time/eval": 12.34,
        "epoch": 0.5,
    }
    line = "step 20 eval  addition avg@4 41.2% maj@4 50.0% len 27.4 | minerva_math pass@1 50.0%  (12.3 s)"
    assert evaluation_line(20, logs) == line
    # written where the bar is (stderr), and the bar's postfix keeps the training metrics
    bar = MetricsProgressCallback()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = TrainerState(max_steps=40, global_step=20), TrainerControl()
    bar.on_train_begin(args, state, control)
    bar.on_log(args, state, control, logs={"loss": 0.5, "reward": 0.25})
    bar.on_log(args, state, control, logs=logs)
    assert bar.training_bar.postfix == "loss=0.5, reward=0.25"
    bar.on_train_end(args, state, control)
    out, err = capsys.readouterr()
    assert line in err and line not in out


@pytest.mark.parametrize(
    ("benchmarks", "settings", "message"),
    [
        (["nope"], {}, r"needs benchmarks from .*addition.*got \['nope'\]"),
        ([], {}, r"needs benchmarks from"),
        (["addition"], {"steps": 0}, "steps must be a positive integer, got 0"),
        (["addition"], {"n": 0}, "n must be a positive integer"),
        (["addition"], {"max_tokens": 0}, "max_tokens must be a positive integer"),
        (["addition"], {"temperature": -1.0}, "temperature must be >= 0"),
    ],
)
def test_callback_arguments_are_checked(benchmarks, settings, message):
    steps = settings.pop("steps", 2)
    with pytest.raises(ValueError, match=message):
        StepEvaluationCallback(None, benchmarks, steps, **settings)
