"""The answers-only study (`benchmarks/answers_only_study.py`) in its `--quick` mode, on a subset of rows
that fits CI: π_θ0, SFT on the traced part, the variational pipeline (Acc) and CoVRL at α = 0.5, each
trained by a real `reasoning train` child process and evaluated by `reasoning eval` on vLLM. The full
tables come from the study's long runs (docs/answers_only_study.md), never from this test."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "answers_only_study.py"
ROWS = ("theta0", "sft_traced", "var_acc", "covrl_a0.5")


def _study():
    spec = importlib.util.spec_from_file_location("answers_only_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--task", "addition", "--quick", "--run-dir", str(run_dir), *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1400)


@pytest.mark.parametrize("task", ["countdown", "addition", "addition_flawed"])
def test_each_task_splits_its_questions_into_a_traced_part_and_answers_only(task, tmp_path):
    study = _study()
    args = study.parse_args(["--task", task, "--run-dir", str(tmp_path), "--train-questions", "400"])
    data = study.write_data(args)
    answers = [json.loads(line) for line in data["answers"].read_text().splitlines()]
    traced = [json.loads(line) for line in data["traced"].read_text().splitlines()]
    full = [json.loads(line) for line in data["all_traces"].read_text().splitlines()]
    assert len(answers) == len(full) == 400
    assert 0.02 <= len(traced) / len(answers) <= 0.10  # --traced 0.05 of the questions
    assert all(r["solution"] for r in traced) and all(r["traced"] for r in traced)
    answers_only = [r for r in answers if not r["traced"]]
    assert answers_only and all(not r["solution"] for r in answers_only)
    # the same questions in every file, every answers-only record with the true answer
    assert [r["question"] for r in answers] == [r["question"] for r in full]
    assert all(r["solution"] for r in full)
    assert all(a["answer"] == f["answer"] for a, f in zip(answers, full) if not a["traced"])
    wrong = sum(a["answer"] != f["answer"] for a, f in zip(answers, full) if a["traced"])
    if task == "addition_flawed":  # the teacher forgot carries in its traces and so in its answers
        assert wrong > 0
    else:
        assert wrong == 0


def test_an_unknown_row_is_refused_with_the_list_of_rows(tmp_path):
    done = _run(tmp_path, "--only", "theta0,var_accc")
    assert done.returncode == 2
    assert "unknown rows ['var_accc']" in done.stderr and "var_acc_t2" in done.stderr
    assert not (tmp_path / "init").exists()  # refused before any training


@pytest.mark.slow
@pytest.mark.vllm
def test_quick_study_writes_its_rows_table_and_plot_and_resumes(tmp_path):
    run_dir = tmp_path / "study"
    done = _run(run_dir, "--only", ",".join(ROWS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == "addition" and list(results["rows"]) == list(ROWS)
    for name, row in results["rows"].items():
        assert 0.0 <= row["greedy"] <= 100.0 and 0.0 <= row["avg@2"] <= row["pass@2"] <= 100.0
        if name != "theta0":
            assert row["seconds"] > 0.0  # a training child process ran
            assert row["vs_theta0"]["n"] == 16  # paired over the same 16 held-out questions
    assert results["rows"]["sft_traced"]["samples"] == 0
    assert results["rows"]["var_acc"]["samples"] > 0 and results["rows"]["covrl_a0.5"]["samples"] > 0
    assert results["iwae"]["q_phi"] is not None  # var_acc's IWAE bounds with the posterior as proposal
    table = (run_dir / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ROWS)
    assert (run_dir / "accuracy.png").stat().st_size > 0
    # a rerun finds every row done: no training (no training log is written to), the same figures
    logs = {log: log.stat().st_mtime_ns for log in run_dir.rglob("study.log")}
    assert len(logs) == len(ROWS)  # init (π_θ0) and the three trained rows
    again = _run(run_dir, "--only", ",".join(ROWS))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["rows"] == results["rows"]
    assert all(f"[study] {name}" in again.stdout for name in ROWS)
    assert {log: log.stat().st_mtime_ns for log in run_dir.rglob("study.log")} == logs


PUBLISHED = sorted(p.name.removeprefix("answers-only-") for p in (REPO / "docs" / "studies").glob("answers-only-*"))


@pytest.mark.parametrize("published", PUBLISHED)
def test_docs_tables_are_the_committed_results(published, tmp_path):
    """Each trainer page's study table is what `--docs` writes from docs/studies/.../results.json."""
    study = _study()
    task = published.replace("-", "_")
    docs = tmp_path / "docs"
    docs.mkdir()
    for page in study.PAGES:
        (docs / f"{page}.md").write_text((REPO / "docs" / f"{page}.md").read_text())
    study.DOCS = docs
    run_dir = REPO / "docs" / "studies" / f"answers-only-{published}"
    args = study.parse_args(["--task", task, "--run-dir", str(run_dir), "--docs"])
    study.main(["--task", task, "--run-dir", str(run_dir), "--docs"])
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["task"] == task
    args.k = summary["settings"]["k"]
    for page, rows in study.PAGES.items():
        written = (docs / f"{page}.md").read_text()
        assert written == (REPO / "docs" / f"{page}.md").read_text(), f"docs/{page}.md is stale: run --docs"
        assert f"<!-- study:{task} -->\n" + study.table(args, summary["rows"], rows) in written
        assert all(f"| {row} |" in written for row in rows)
    assert (docs / "studies" / f"answers-only-{published}" / "results.json").exists()
