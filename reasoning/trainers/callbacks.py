"""transformers callbacks every trainer in this package uses."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


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


class JsonlMetricsCallback(TrainerCallback):
    """Append every logged metrics dict, with step and wall time, to `<output_dir>/metrics.jsonl`."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.start = time.monotonic()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        path = self.path or Path(args.output_dir) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            "time": time.monotonic() - self.start,
            **logs,
        }
        with path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
