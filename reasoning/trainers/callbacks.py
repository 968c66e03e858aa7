"""transformers callbacks every trainer in this package uses."""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import ProgressCallback, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback

if TYPE_CHECKING:
    from transformers import Trainer


# The cost of one evaluation during training (`reasoning.trainers.evaluation`); its presence marks
# a logged dict as that evaluation's record rather than a training log.
EVAL_TIME = "time/eval"


def is_evaluation_log(logs: dict[str, Any]) -> bool:
    """Whether a logged dict is the record of an evaluation during training."""
    return EVAL_TIME in logs


class TimeLimitCallback(TrainerCallback):
    """Stop training (and save, as at the end of any run) once `seconds` of training have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start: float | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        self.start = time.monotonic()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        if self.start is not None and time.monotonic() - self.start >= self.seconds:
            control.should_training_stop = True
        return control


def rewind_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Rewrite the JSON-lines file `path` with only the records `keep` accepts, atomically (a crash
    leaves the old file or the new one); a line cut short by a killed writer is dropped. Returns the
    records kept. A resumed run calls this so that the steps it redoes after its checkpoint appear
    once, from the run that continues, instead of twice."""
    if not path.exists():
        return []
    kept, lines = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and keep(record):
            kept.append(record)
            lines.append(line + "\n")
    partial = path.with_name(path.name + ".rewind")
    partial.write_text("".join(lines))
    os.replace(partial, path)
    return kept


class JsonlMetricsCallback(TrainerCallback):
    """Append every logged metrics dict, with step and wall time, to `<output_dir>/metrics.jsonl`.

    A run that starts at global step c (c > 0: resumed from checkpoint c; 0: from scratch) first
    drops what an interrupted attempt wrote after c, including its end-of-training summary at c:
    the run logs those steps again, and each step appears once. Records at step c itself were
    written before checkpoint c and are kept, except at c = 0, where they come from the start of
    training (the evaluation at step 0), which a run from scratch repeats. `time` continues from
    the last record kept (time spent training, not time since the first launch). A second `train`
    call in the same process appends."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.start = time.monotonic()
        self.rewound = False

    def _path(self, args: TrainingArguments) -> Path:
        return self.path or Path(args.output_dir) / "metrics.jsonl"

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        if not state.is_world_process_zero or self.rewound:
            return
        self.rewound = True
        step = state.global_step
        kept = rewind_jsonl(
            self._path(args),
            lambda r: r.get("step", 0) < step or (0 < step == r.get("step") and "train_runtime" not in r),
        )
        times = [r["time"] for r in kept if isinstance(r.get("time"), (int, float))]
        self.start = time.monotonic() - (times[-1] if times else 0.0)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        path = self._path(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            "time": time.monotonic() - self.start,
            **logs,
        }
        with path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")


# Progress-bar label -> metric names (regular expressions) tried in order; the first logged one is shown.
KEY_METRICS: tuple[tuple[str, str], ...] = (
    ("loss", r"^loss$"),
    ("reward", r"^reward$"),
    ("acc", r"^rewards/correctness/mean$|accuracy$"),
    ("kl", r"(^|/)kl($|_)"),
    ("logZ", r"(^|/)log_z$"),
    ("entropy", r"^entropy$"),
    ("len", r"^completions/mean_length$"),
)


def key_metrics(logs: dict[str, Any]) -> dict[str, float]:
    """The few numbers worth a glance during training, picked from one logged metrics dict."""
    shown: dict[str, float] = {}
    for label, pattern in KEY_METRICS:
        for name, value in logs.items():
            if isinstance(value, (int, float)) and math.isfinite(value) and re.search(pattern, name):
                shown[label] = float(value)
                break
    return shown


def evaluation_line(step: int, logs: dict[str, Any]) -> str:
    """`step 20 eval  addition avg@4 41.2% pass@4 70.0% maj@4 45.0% len 27.4  (12.3 s)` from an
    evaluation record: per benchmark its accuracies in %, the mean completion length in tokens; the cost."""
    shown: dict[str, list[str]] = {}
    for name, value in logs.items():
        if name.startswith("eval/") and isinstance(value, (int, float)):
            benchmark, metric = name[len("eval/") :].rsplit("/", 1)
            text = f"len {value:.1f}" if metric == "mean_length" else f"{metric} {100 * value:.1f}%"
            shown.setdefault(benchmark, []).append(text)
    parts = " | ".join(f"{benchmark} {' '.join(texts)}" for benchmark, texts in shown.items())
    return f"step {step} eval  {parts}  ({logs.get(EVAL_TIME, math.nan):.1f} s)"


class MetricsProgressCallback(ProgressCallback):
    """transformers' tqdm bar with the key metrics (reward, accuracy, KL, ..., seconds per step) as its
    postfix, updated at every log, instead of a printed dict per log (metrics.jsonl keeps them all)."""

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        super().on_train_begin(args, state, control, **kw)
        self._last = (time.monotonic(), state.global_step)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "train_runtime" in logs:  # the end-of-training summary: print it as transformers does
            return super().on_log(args, state, control, logs=logs, **kw)
        if is_evaluation_log(logs):  # one line above the bar; the postfix keeps the training metrics
            self.training_bar.write(evaluation_line(state.global_step, logs), file=self.training_bar.fp)
            return
        postfix = {k: f"{v:.4g}" for k, v in key_metrics(logs).items()}
        now, step = time.monotonic(), state.global_step
        if step > self._last[1]:
            postfix["s/step"] = f"{(now - self._last[0]) / (step - self._last[1]):.3g}"
        self._last = (now, step)
        self.training_bar.set_postfix(postfix, refresh=True)


class CompletionsTableCallback(TrainerCallback):
    """At each log, send the rows added to `<output_dir>/completions.jsonl` since the last one to the
    `report_to` integrations: a `wandb.Table` named `completions` and a TensorBoard text summary
    `completions` (a markdown table), at most `max_rows` rows per log, texts cut at `max_chars`."""

    COLUMNS = ("step", "prompt", "completion", "reward", "advantage", "finish_reason")

    def __init__(self, tensorboard: TrainerCallback | None = None, max_rows: int = 64, max_chars: int = 500):
        self.tensorboard = tensorboard  # transformers' TensorBoardCallback: its writer is reused
        self.max_rows, self.max_chars = max_rows, max_chars
        self.offset = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        # a resumed run has already sent the rows before this point
        path = Path(args.output_dir) / "completions.jsonl"
        self.offset = path.stat().st_size if path.exists() else 0

    def _new_rows(self, args: TrainingArguments) -> list[dict[str, Any]]:
        path = Path(args.output_dir) / "completions.jsonl"
        if not path.exists():
            return []
        with path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # only whole lines; a partial one is read next time
        self.offset += end
        return [json.loads(line) for line in data[:end].decode().splitlines() if line.strip()]

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw):
        if not state.is_world_process_zero or is_evaluation_log(logs or {}):  # rows go with training logs
            return
        rows = self._new_rows(args)[: self.max_rows]
        if not rows:
            return
        names = sorted({name for row in rows for name in row.get("rewards", {})})
        columns = [*self.COLUMNS, *(f"rewards/{n}" for n in names)]
        table = [
            [_cut(row.get(c), self.max_chars) for c in self.COLUMNS]
            + [row.get("rewards", {}).get(n) for n in names]
            for row in rows
        ]
        writer = getattr(self.tensorboard, "tb_writer", None)
        if writer is not None:
            writer.add_text("completions", _markdown_table(columns, table), state.global_step)
            writer.flush()
        if "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                # transformers' WandbCallback plots everything against train/global_step
                wandb.run.log(
                    {
                        "completions": wandb.Table(columns=columns, data=table),
                        "train/global_step": state.global_step,
                    }
                )


def _cut(value: Any, limit: int) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "…"
    return value


def _markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
        return text.replace("|", "\\|").replace("\n", "⏎ ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def attach_run_callbacks(trainer: Trainer) -> None:
    """Swap transformers' progress bar for `MetricsProgressCallback` (when the bar is on) and add a
    `CompletionsTableCallback` when `report_to` includes tensorboard or wandb."""
    callbacks = trainer.callback_handler.callbacks
    if any(type(cb) is ProgressCallback for cb in callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(MetricsProgressCallback())
    tensorboard = next((cb for cb in callbacks if isinstance(cb, TensorBoardCallback)), None)
    if tensorboard is not None or "wandb" in trainer.args.report_to:
        trainer.add_callback(CompletionsTableCallback(tensorboard))
