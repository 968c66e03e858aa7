"""`reasoning.report` without a training run: metric grouping across trainers, run-directory
reading (partial lines, stage directories, clear errors) and the `report` command's errors."""

import json

import pytest
from typer.testing import CliRunner

from reasoning.cli import app
from reasoning.report import (
    MAX_LINES_PER_PANEL,
    ReportError,
    Series,
    group_metrics,
    load_run,
    panel_lines,
    plot_timing,
    records_by_step,
    timing_rows,
)
from reasoning.trainers.callbacks import key_metrics

# metric names logged by the trainers of this package (grpo, covrl, bayes, gflownet, latent_thought)
NAMES = [
    "loss",
    "grad_norm",
    "learning_rate",
    "reward",
    "reward_std",
    "rewards/correctness/mean",
    "rewards/correctness/std",
    "completions/mean_length",
    "completions/truncated_ratio",
    "kl",
    "entropy",
    "clip_ratio/low",
    "time/generation",
    "time/sync",
    "prior/kl",
    "prior/reward",
    "trace_length",
    "bayes/kl_policy_base",
    "bayes/tv_target_policy",
    "bayes/log_z",
    "bayes/ess",
    "gfn/log_z",
    "gfn/log_reward",
    "gfn/accuracy",
    "loss/modified_subtb",
    "latent/nelbo_end",
    "latent/kl",
    "diversity/pairwise",
    "frac_reward_zero_std",
    "rewards/failures",
]


def test_metrics_of_every_trainer_land_in_their_panel():
    panels = dict(group_metrics(NAMES))
    assert panels["Accuracy"] == ["rewards/correctness/mean", "gfn/accuracy"]
    assert panels["Reward"] == [
        "reward",
        "reward_std",
        "rewards/correctness/std",
        "prior/reward",
        "gfn/log_reward",
    ]
    assert panels["KL / divergences"] == [
        "kl",
        "prior/kl",
        "bayes/kl_policy_base",
        "bayes/tv_target_policy",
        "latent/kl",
    ]
    assert panels["log Ẑ (estimated log partition function)"] == ["bayes/log_z", "gfn/log_z"]
    assert panels["Response length (tokens)"] == ["completions/mean_length", "trace_length"]
    assert panels["Loss"] == ["loss", "loss/modified_subtb", "latent/nelbo_end"]
    assert panels["Clip fraction"] == ["clip_ratio/low"] and panels["Entropy"] == ["entropy"]
    assert panels["Failures and skipped steps"] == ["rewards/failures"]
    # the rest by prefix, "other" last; timing has its own chart
    assert panels["bayes"] == ["bayes/ess"] and panels["diversity"] == ["diversity/pairwise"]
    assert list(panels)[-1] == "other" and panels["other"] == ["frac_reward_zero_std"]
    grouped = [name for members in panels.values() for name in members]
    assert sorted(grouped) == sorted(n for n in NAMES if not n.startswith("time/"))


def test_crowded_panels_are_split_keeping_each_metric_whole():
    series = [
        Series(f"run{i}", [{"step": 1, "reward": 1.0, "reward_std": 0.5, "rewards/x/mean": 0.1}])
        for i in range(4)
    ]
    panels = panel_lines(series)
    assert [title for title, _ in panels] == ["Reward (1/2)", "Reward (2/2)"]
    assert all(len(lines) <= MAX_LINES_PER_PANEL for _, lines in panels)
    assert panels[0][1] == [(i, n) for n in ("reward", "reward_std") for i in range(4)]
    assert panels[1][1] == [(i, "rewards/x/mean") for i in range(4)]


def test_run_directory_with_stages_and_a_half_written_line(tmp_path):
    run = tmp_path / "pipeline"
    for stage, loss in (("prior", 2.0), ("posterior", 3.0)):
        (run / stage).mkdir(parents=True)
        (run / stage / "metrics.jsonl").write_text(
            json.dumps({"step": 1, "loss": loss})
            + "\n"
            + json.dumps({"step": 2, "train_runtime": 1.5})
            + "\n"
            + '{"step": 3, "lo'  # a run still writing
        )
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    loaded = load_run(run)
    assert [(s.label, s.records, s.summary) for s in loaded.series] == [
        ("pipeline/posterior", [{"step": 1, "loss": 3.0}], {"step": 2, "train_runtime": 1.5}),
        ("pipeline/prior", [{"step": 1, "loss": 2.0}], {"step": 2, "train_runtime": 1.5}),
    ]


def test_missing_or_empty_run_directories_are_clear_errors(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(ReportError, match="no metrics.jsonl, completions.jsonl or eval/\\*/results.json"):
        load_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())


def test_progress_bar_picks_the_key_metrics_of_any_trainer():
    assert key_metrics(
        {
            "loss": 0.5,
            "reward": 0.25,
            "rewards/correctness/mean": 0.125,
            "kl": 0.01,
            "entropy": 1.5,
            "completions/mean_length": 30.0,
            "grad_norm": 2.0,
        }
    ) == {"loss": 0.5, "reward": 0.25, "acc": 0.125, "kl": 0.01, "entropy": 1.5, "len": 30.0}
    assert key_metrics({"gfn/accuracy": 0.5, "gfn/log_z": -3.0, "bayes/kl_policy_base": 0.2}) == {
        "acc": 0.5,
        "logZ": -3.0,
        "kl": 0.2,
    }
    assert key_metrics({"reward": float("nan"), "learning_rate": 1e-3}) == {}


def test_evaluations_during_training_get_one_panel_per_benchmark_first():
    names = [
        "loss",
        "eval/addition/avg@4",
        "eval/addition/pass@1",
        "eval/addition/maj@4",
        "eval/addition/mean_length",
        "eval/minerva_math/avg@1",
        "completions/mean_length",
        "time/eval",
    ]
    panels = group_metrics(names)
    assert panels[:2] == [
        (
            "Evaluation during training (addition)",
            ["eval/addition/avg@4", "eval/addition/pass@1", "eval/addition/maj@4"],
        ),
        ("Evaluation during training (minerva_math)", ["eval/minerva_math/avg@1"]),
    ]
    # the evaluation's completion length beside the training one; its cost in the timing chart
    assert dict(panels)["Response length (tokens)"] == [
        "eval/addition/mean_length",
        "completions/mean_length",
    ]
    assert "time/eval" not in [n for _, members in panels for n in members]


def test_timing_rows_give_seconds_per_call_and_evaluations_share_a_bar():
    records = [
        {"step": 0, "time": 1.0, "time/eval": 2.0},
        {"step": 1, "time": 2.0, "time/generation": 0.5},
        {"step": 2, "time": 6.0, "time/eval": 3.0},
        {"step": 2, "time": 6.1, "time/generation": 0.7},
    ]
    rows = timing_rows([Series("run", records)])
    assert rows == [
        {"series": "run", "phase": "time/eval", "records": 2, "mean": 2.5, "max": 3.0},
        {"series": "run", "phase": "time/generation", "records": 2, "mean": 0.6, "max": 0.7},
    ]
    assert records_by_step(records) == {
        0: records[0],
        1: records[1],
        2: {"step": 2, "time": 6.1, "time/eval": 3.0, "time/generation": 0.7},
    }
    assert plot_timing(Series("run", records)).startswith("data:image/png;base64,")
