"""Evaluation during training (`eval.steps`) on two ranks: the problems are shared out and gathered back.

A 2-step GRPO recipe (transformers rollouts on the live policy) with 130 problems per evaluation, i.e.
batches of 64, 64 and 2 problems: rank 0 takes batches 0 and 2, rank 1 batch 1 and then generates one
problem it drops, so that both ranks generate three times (under ZeRO-3 `generate` is a collective).
Seeds belong to the batch, not to the rank, so the numbers must be those of one process: the evaluation
at step 0 equals `reasoning.eval.evaluate` of the starting checkpoint in this process and the one at
step 2 the evaluation of `final/` (by rank 0 alone, after training), to the last digit. Run under DDP
(`accelerate launch`, gloo) and under DeepSpeed ZeRO-3 with every parameter partitioned (`torchrun`:
docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "accelerate" / "multi_gpu.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ds_runner import zero_config  # noqa: E402

KEYS = ("avg@2", "pass@1", "pass@2", "maj@2", "mean_length")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recipe_args(model: Path, output_dir: Path) -> list[str]:
    return [
        "train", "recipes/demo/grpo.yaml",
        "--model.path", str(model),
        "--data.train", "synthetic:addition?digits=3&n=64&seed=1&split=train",
        "--rollout.engine", "hf", "--rollout.engine_kwargs", "{}", "--rollout.max_tokens", "32",
        "--grpo.num_generations", "4", "--reward.functions", "[correctness, answer_format]",
        "--eval.benchmarks", "[addition]", "--eval.n", "2", "--eval.temperature", "1.0",
        "--eval.limit", "130", "--eval.steps", "2", "--eval.before", "false", "--eval.engine", "hf",
        "--training.max_steps", "2", "--training.per_device_train_batch_size", "8", "--training.learning_rate", "1e-3",
        "--training.logging_steps", "1", "--training.save_steps", "100", "--training.disable_tqdm", "true",
        "--training.output_dir", str(output_dir),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(trained_tiny_dir) -> dict:
    """The starting checkpoint's evaluation with the same settings, in this process."""
    from reasoning.eval.evaluate import evaluate

    results = evaluate(str(trained_tiny_dir), ["addition"], n=2, temperature=1.0, limit=130, engine="hf")
    return results["benchmarks"]["addition"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_two_ranks_evaluate_as_one_process(backend, trained_tiny_dir, one_process, tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    out = tmp_path / "run"
    args = recipe_args(trained_tiny_dir, out)
    if backend == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"
        launcher = [
            "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
            "--mixed_precision", "no", "--main_process_port", str(_free_port()),
        ]  # fmt: skip
    else:
        env["DS_ACCELERATOR"] = "cpu"
        port = str(_free_port())
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
        args += ["--training.use_cpu", "true", "--training.deepspeed", json.dumps(zero_config(3))]
    command = [sys.executable, *launcher, "-m", "reasoning", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1100)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "time/eval" in r]
    assert [r["step"] for r in evaluations] == [0, 2]
    final = json.loads((out / "eval" / "final" / "results.json").read_text())["benchmarks"]["addition"]
    for row, expected in zip(evaluations, (one_process, final)):
        assert expected["problems"] == 130
        assert {k: row[f"eval/addition/{k}"] for k in KEYS} == {k: expected[k] for k in KEYS}, row["step"]
    assert evaluations[0]["eval/addition/mean_length"] != evaluations[1]["eval/addition/mean_length"]
