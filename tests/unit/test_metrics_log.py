"""metrics.jsonl after a resume: the interrupted run's records past the checkpoint are replaced."""

from __future__ import annotations

import json

from transformers import TrainerControl, TrainerState, TrainingArguments

from reasoning.trainers.callbacks import JsonlMetricsCallback, rewind_jsonl


def test_rewind_keeps_accepted_records_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # killed mid-write
    kept = rewind_jsonl(path, lambda r: r["step"] != 2)
    assert kept == [{"step": 1}, {"step": 3}]
    assert [json.loads(line) for line in path.read_text().splitlines()] == kept
    assert not list(tmp_path.glob("*.rewind"))
    assert rewind_jsonl(tmp_path / "absent.jsonl", lambda r: True) == []


def test_resumed_run_replaces_records_after_its_checkpoint(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    path = tmp_path / "metrics.jsonl"
    first = JsonlMetricsCallback(path)
    state, control = TrainerState(), TrainerControl()
    for step in (1, 2, 3):
        state.global_step = step
        first.on_log(args, state, control, logs={"loss": float(step)})
    state.global_step = 3
    first.on_log(args, state, control, logs={"train_runtime": 9.0, "train_loss": 2.0})  # the end summary

    resumed = JsonlMetricsCallback(path)
    state.global_step = 2  # the last checkpoint is step 2: steps 3 and the summary are redone
    resumed.on_train_begin(args, state, control)
    state.global_step = 3
    resumed.on_log(args, state, control, logs={"loss": 30.0})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r.get("loss")) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert records[2]["time"] >= records[1]["time"]  # time continues from the kept records

    resumed.on_train_begin(args, state, control)  # a second `train` in the same process appends
    state.global_step = 4
    resumed.on_log(args, state, control, logs={"loss": 40.0})
    assert len(path.read_text().splitlines()) == 4

    restarted = JsonlMetricsCallback(path)
    state.global_step = 0  # killed before the first checkpoint: the run starts over, from scratch
    restarted.on_train_begin(args, state, control)
    assert path.read_text() == ""
