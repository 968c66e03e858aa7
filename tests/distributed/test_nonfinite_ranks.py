"""A NaN loss on one rank of two skips the same optimizer step on both, with DDP and DeepSpeed ZeRO-2.

One `torchrun --nproc_per_node 2` launch (gloo, CPU) runs `nonfinite_runner.py`: SFT, gradient
accumulation 2, the first micro-batch of step 1 NaN on rank 1 only. The ranks decide together (one
all-reduce of a flag per micro-batch), so on both the weights after step 1 equal those after step 0,
steps 0 and 2 train, the metric counts the skip, and the ranks end with the same weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "distributed" / "nonfinite_runner.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(600)
def test_nan_on_one_rank_skips_the_step_on_both(tmp_path):
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    launch = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), str(RUNNER), str(tmp_path), "ddp,zero2",
    ]  # fmt: skip
    result = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    for backend in ("ddp", "zero2"):
        ranks = [torch.load(tmp_path / backend / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
        for rank, run in enumerate(ranks):
            weights = [run["initial"], *run["steps"]]
            changed = [not _same(before, after) for before, after in zip(weights, weights[1:])]
            assert changed == [True, False, True], f"{backend} rank {rank}: steps that moved the weights"
            skipped = [e["train/nonfinite_loss_skipped"] for e in run["log_history"] if "loss" in e]
            assert skipped == [0.0, 1.0, 0.0], f"{backend} rank {rank}"
        assert _same(ranks[0]["steps"][-1], ranks[1]["steps"][-1]), f"{backend}: the ranks' weights differ"
