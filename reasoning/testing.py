"""Short CPU runs for tests and smoke checks: one place for the training arguments they share and for
the briefly trained tiny policy they start from (the test suite's fixtures and the examples use it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from reasoning.data.datasets import load_records
from reasoning.models.tiny import build_tiny_model
from reasoning.trainers.sft import make_sft_trainer

# one process on the CPU, no checkpoints, no reporting, no progress bars, a log line every step
CPU_RUN = dict(
    gradient_accumulation_steps=1,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
)


def cpu_training_args(output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    """`TrainingArguments` of a short CPU run into `output_dir` (`CPU_RUN`, then `overrides`)."""
    return TrainingArguments(output_dir=str(output_dir), **{**CPU_RUN, **overrides})


def train_tiny_sft(
    path: str | Path, data: str, steps: int, start: str | Path | None = None, size: str = "1m", **overrides: Any
) -> Path:
    """SFT for `steps` steps of 64 records of `data` (a `load_records` spec) at learning rate 3e-3 with 5
    warm-up steps (then `overrides` of the training arguments), from the saved model `start` or a fresh
    tiny model of `size`; saved to `path`."""
    path = Path(path)
    if start is None:
        model, tokenizer = build_tiny_model(size, seed=0)
    else:
        model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(start)
    settings = dict(max_steps=steps, per_device_train_batch_size=64, learning_rate=3e-3, warmup_steps=5)
    args = cpu_training_args(path / "run", **{**settings, "logging_steps": 500, **overrides})
    make_sft_trainer(model, tokenizer, load_records(data), args).train()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
