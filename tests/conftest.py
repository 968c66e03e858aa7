"""Shared fixtures: a briefly trained tiny model (non-degenerate outputs) and one vLLM engine per session."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from reasoning.data.datasets import load_records  # noqa: E402
from reasoning.models.tiny import build_tiny_model  # noqa: E402
from reasoning.trainers.sft import make_sft_trainer  # noqa: E402


@pytest.fixture(scope="session")
def trained_tiny_dir(tmp_path_factory):
    """A 1M-parameter model after 60 SFT steps on addition: it writes the format, often wrongly."""
    path = tmp_path_factory.mktemp("tiny-trained")
    model, tokenizer = build_tiny_model("1m", seed=0)
    records = load_records("synthetic:addition?digits=3&n=4000&seed=5&split=train")
    args = TrainingArguments(
        output_dir=str(path / "run"),
        max_steps=60,
        per_device_train_batch_size=64,
        learning_rate=3e-3,
        warmup_steps=5,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    make_sft_trainer(model, tokenizer, records, args).train()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vllm_engine(trained_tiny_dir):
    """One in-process vLLM engine (CPU build, fp32) for the whole test session."""
    from reasoning.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(trained_tiny_dir), dtype="float32", max_model_len=256, seed=0)
    yield engine
    engine.close()


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def run_cli():
    """Run the real `reasoning` command (`python -m reasoning ...`) from the repository root."""

    def run(*args: str, timeout: float = 600, env: dict | None = None, module: list[str] | None = None):
        environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
        command = [sys.executable, *(module or ["-m", "reasoning"]), *args]
        return subprocess.run(
            command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout
        )

    return run
