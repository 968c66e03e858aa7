"""Plumbing of the variational-reasoning pipeline (`trainers/variational.py`): resumable stage folders,
model loading, an SFT stage, reading scored traces back as tensors, and the bound's plot.

No mathematics here: the weights and estimators are `reasoning/objectives/variational.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_from_disk
from rich.console import Console
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)

from reasoning.data.templates import TraceCutter
from reasoning.models.lora import apply_lora
from reasoning.objectives.variational import log_acc_estimator, log_gml_estimator, log_likelihood_estimator
from reasoning.rollout import Rollout
from reasoning.trainers.callbacks import JsonlMetricsCallback
from reasoning.trainers.checkpoint import latest_complete_checkpoint, save_trained_policy
from reasoning.trainers.sft import SFTConfig, make_sft_trainer


class StagedRun:
    """Stages that each write `<run_dir>/<stage>/` and, when finished, a `DONE` marker holding their
    summary: a finished stage is skipped on rerun (its summary read back), an unfinished one runs again."""

    def __init__(self, run_dir: Path, console: Console) -> None:
        self.run_dir = run_dir
        self.console = console

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def done(self, name: str) -> bool:
        return (self.stage_dir(name) / "DONE").exists()

    def _finish(self, name: str, info: dict[str, Any]) -> None:
        marker = self.stage_dir(name) / "DONE"
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2, default=str))
        os.replace(tmp, marker)  # atomic: a kill leaves either no marker or a whole one

    def _stage(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if self.done(name):
            self.console.print(f"[yellow]variational: stage {name!r} already done, skipping")
            return json.loads((self.stage_dir(name) / "DONE").read_text())
        self.console.print(f"[bold]variational: stage {name!r}")
        self.stage_dir(name).mkdir(parents=True, exist_ok=True)
        info = fn()
        self._finish(name, info)
        return info


def check_records(records: Dataset, hint_column: str) -> None:
    """A ValueError unless the records have question/answer/solution and the hint column."""
    missing = {"question", "answer", "solution"} - set(records.column_names)
    if missing:
        raise ValueError(
            f"the variational pipeline needs records with question/answer/solution; missing {sorted(missing)}"
        )
    if hint_column not in records.column_names:
        raise ValueError(
            f"variational.hint_column {hint_column!r} is not a column of the data "
            f"({', '.join(records.column_names)})"
        )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A checkpoint's tokenizer, with pad = EOS when it has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A checkpoint's model (in `dtype`) and tokenizer (`load_tokenizer`)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), load_tokenizer(path)


def publish_model(source: str, target: Path, dtype: torch.dtype) -> None:
    """Copy the checkpoint `source` to `target`, written beside and renamed: `reasoning train` takes
    `target/config.json` as "finished"."""
    partial = target.with_name(target.name + ".partial")
    model, tokenizer = load_causal_lm(source, dtype)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)


def sft_stage(
    out: Path,
    init: str,
    records: Dataset,
    training: dict[str, Any],
    sft: SFTConfig,
    *,
    max_steps: int | None,
    dtype: torch.dtype,
    lora: dict[str, Any] | None,
) -> dict[str, Any]:
    """SFT of the checkpoint `init` on `records` in `out` (resumed from its last complete checkpoint);
    the trained model and tokenizer in `out/final` (a LoRA policy: the merged model, and adapter/)."""
    values = {**training, "output_dir": str(out)}
    if max_steps is not None:
        values["max_steps"] = max_steps
    args = TrainingArguments(**values)  # before the model, as the Trainer's own launches do
    model, tokenizer = load_causal_lm(init, dtype)
    if lora is not None:
        model = apply_lora(model, lora)
    callbacks = [JsonlMetricsCallback(out / "metrics.jsonl")]
    trainer = make_sft_trainer(model, tokenizer, records, args, sft, callbacks=callbacks)
    result = trainer.train(resume_from_checkpoint=latest_complete_checkpoint(out))
    save_trained_policy(trainer, out / "final")
    tokenizer.save_pretrained(out / "final")
    return {"path": str(out / "final"), "train_loss": result.training_loss, "samples": len(records)}


def trace_row(rollout: Rollout, cutter: TraceCutter) -> dict[str, Any]:
    """A sampled completion cut before its answer marker: `trace_ids` and `trace` (text), the
    completion's own `marker`, `valid` (a marker with a trace before it, not cut by the token budget).
    A trace without a marker, or with nothing before it, keeps the whole completion (EOS dropped)."""
    cut = cutter(rollout.completion_ids, rollout.truncated)
    found = cut.marker_found and len(cut.trace) > 0
    whole = list(rollout.completion_ids)
    whole = whole[:-1] if whole and whole[-1] == cutter.tokenizer.eos_token_id else whole
    trace_ids = cut.trace if found else whole
    return {
        "trace_ids": trace_ids,
        "trace": cutter.tokenizer.decode(trace_ids),
        "marker": cut.marker if found else None,
        "completion": rollout.text,
        "valid": found and not rollout.truncated,
        "finish_reason": rollout.finish_reason,
    }


def grouped_scores(
    stage: Path, answer_samples: int
) -> list[tuple[int, list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """A stage's scored traces (`stage/data`) per question: (question index, its rows by k, float64
    tensors over its traces: `trace_logp_prior`, `trace_logp_posterior`, `trace_length` (≥ 1),
    `valid` and the three log-estimators of π(Y|x, z): `acc` (of `answer_samples` graded answers),
    `gml` and `l`)."""
    by_question: dict[int, list[dict[str, Any]]] = {}
    for row in load_from_disk(str(stage / "data")):
        by_question.setdefault(row["question_index"], []).append(row)
    n_answers = max(answer_samples, 1)
    out = []
    for q, rows in sorted(by_question.items()):
        rows = sorted(rows, key=lambda r: r["k"])
        width = max(len(r["answer_token_logps"]) for r in rows)
        answer = torch.zeros(len(rows), width, dtype=torch.float64)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            answer[i, : len(r["answer_token_logps"])] = torch.tensor(r["answer_token_logps"])
            mask[i, : len(r["answer_token_logps"])] = True
        tensors = {
            name: torch.tensor([r[name] for r in rows], dtype=torch.float64)
            for name in ("trace_logp_prior", "trace_logp_posterior")
        }
        tensors["trace_length"] = torch.tensor([max(r["trace_length"], 1) for r in rows])
        tensors["valid"] = torch.tensor([r["valid"] for r in rows])
        tensors["acc"] = log_acc_estimator(
            [r.get("answers_correct", 0) for r in rows], n_answers, dtype=torch.float64
        )
        tensors["gml"] = log_gml_estimator(answer, mask)
        tensors["l"] = log_likelihood_estimator(answer, mask)
        out.append((q, rows, tensors))
    return out


def without_solution(record: dict[str, Any]) -> dict[str, Any]:
    """A record's columns but its reference `solution` (which a sampled trace replaces)."""
    return {name: value for name, value in record.items() if name != "solution"}


def trace_and_answer(row: dict[str, Any]) -> dict[str, str]:
    """SFT target of a weighted trace: the trace, and a correct answer sampled after it when Acc found one."""
    answer = row.get("sampled_answer")
    return {"solution": row["trace"], **({"answer": answer} if answer else {})}


def plot_bound(curve: dict[str, float], path: Path, title: str) -> None:
    """Save the IWAE bound against K as a PNG (log-2 axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(k) for k in curve]
    figure, axis = plt.subplots(figsize=(4, 3))
    axis.plot(sizes, [curve[str(k)] for k in sizes], marker="o")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("K (traces per question)")
    axis.set_ylabel("IWAE bound on log π(Y|x) (nats)")
    axis.set_title(f"IWAE bound vs K, {title}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
