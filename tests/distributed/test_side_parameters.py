"""Side parameters (`trainers.roles.SideParameters`) on two ranks: gradients averaged, equal weights after a step.

One `torchrun --nproc_per_node 2` launch (gloo, CPU) runs `side_runner.py`.
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
RUNNER = ROOT / "tests" / "distributed" / "side_runner.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(300)
def test_side_gradients_are_averaged_over_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    launch = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), str(RUNNER), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for run in ranks:
        assert torch.equal(run["reduced"]["weight"], torch.full((2, 3), 1.5))  # mean of 1 and 2
        assert torch.equal(run["reduced"]["bias"], torch.full((2,), 2.0))  # mean of 4 and a missing 0
    for name in ("weight", "bias"):
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])
    torch.manual_seed(0)
    initial = torch.nn.Linear(3, 2)
    assert not torch.equal(ranks[0]["weights"]["weight"], initial.weight)  # the step moved them
