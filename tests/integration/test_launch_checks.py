"""The launch checks against the libraries' real behaviour, in real processes (issue 20, part B).

- Mixed precision: `transformers.Trainer` under an `accelerate launch`-style DeepSpeed environment
  (ACCELERATE_USE_DEEPSPEED, ACCELERATE_MIXED_PRECISION; one process, DeepSpeed on CPU) fails at
  the start of training exactly where `check_launch_precision` refuses, and trains where it passes.
- The variational pipeline under `torchrun --nproc_per_node 2`: both ranks stop with the recipe
  error before any stage folder is written.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from reasoning.recipes import RecipeError, check_launch_precision

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One process, DeepSpeed ZeRO-2 on CPU set up as `accelerate launch --config_file zero2.yaml` would
# (the variables of accelerate.utils.launch.prepare_deepspeed_cmd_env); for each launch precision,
# a Trainer with training.bf16 false trains one step or raises transformers' DeepSpeed mismatch.
TRAIN_UNDER_DEEPSPEED = """
import json, os, sys
os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="2", DS_ACCELERATOR="cpu")
from accelerate.state import AcceleratorState
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from reasoning.models.tiny import build_tiny_model

rows = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 4, "labels": [[5, 6, 7, 8]] * 4})
for launch in sys.argv[2:]:
    os.environ["ACCELERATE_MIXED_PRECISION"] = launch
    AcceleratorState._reset_state(True)
    model, _ = build_tiny_model("1m", seed=0)
    args = TrainingArguments(
        output_dir=sys.argv[1], max_steps=1, per_device_train_batch_size=2, report_to="none",
        save_strategy="no", disable_tqdm=True, bf16=False,
    )
    try:
        Trainer(model=model, args=args, train_dataset=rows).train()
        outcome = "trained"
    except ValueError as error:
        outcome = str(error)
    print("OUTCOME " + json.dumps([launch, outcome]), flush=True)
"""


def test_transformers_stops_a_deepspeed_run_exactly_where_the_recipe_check_refuses(tmp_path):
    launches = ["bf16", "fp16", "no"]
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_UNDER_DEEPSPEED, str(tmp_path / "out"), *launches],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    outcomes = dict(
        json.loads(line[len("OUTCOME ") :]) for line in done.stdout.splitlines() if line.startswith("OUTCOME ")
    )
    assert sorted(outcomes) == sorted(launches), done.stderr[-3000:]
    for launch, outcome in outcomes.items():
        environment = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": launch}
        if launch == "no":
            assert outcome == "trained"
            check_launch_precision({"bf16": False}, environment)
            continue
        # what transformers says when training starts (the model already loaded) ...
        assert "mismatch TrainingArguments values" in outcome
        assert f"ds {launch}.enabled=True vs hf {launch}|{launch}_full_eval=False" in outcome
        # ... the recipe check says before anything is built, with the fix
        with pytest.raises(RecipeError, match=rf"training\.{launch}: true"):
            check_launch_precision({"bf16": False}, environment)


def test_variational_recipe_under_torchrun_stops_on_every_rank_before_writing(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "reasoning", "train", "recipes/demo/variational.yaml",
        "--training.output_dir", str(run_dir), "--training.use_cpu", "true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    # each rank prints the recipe error (exit code 2: rejected before training)
    assert output.count("the variational pipeline runs in one process, and this launch starts 2") == 2, output[-3000:]
    assert "single_gpu.yaml" in output
    assert not run_dir.exists()
