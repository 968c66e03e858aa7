"""Two-process data parallelism (CPU, gloo) gives the single-process result of the same global batch.

Every trainer family runs two optimizer steps (gradient accumulation 2) from one checkpoint: once in
this process with the global batch, once under `accelerate launch --config_file
recipes/accelerate/multi_gpu.yaml --num_processes 2` with `ACCELERATE_USE_CPU=1` (gloo) and half the
batch per rank (one launch runs all families in turn).
What must agree, and why it can differ if the trainers get it wrong:
- the trained weights (|Δ| < 1e-5) and the ranks' copies of them (exactly);
- the logged loss and gradient norm per step (loss normalisation across ranks: DAPO's global token
  count, GA scaling, per-rank means);
- the state kept outside the model: GFlowNet's log Z head (its gradient is averaged by hand), the
  Bayes trainer's pooled Ẑ (pooled over ranks), CoVRL's RLPR threshold; equal on both ranks;
- sample-level metrics (rewards, their stds over the global batch, completion lengths, max length).
Sampling: each prompt is seeded by its position in the global generation batch
(`RolloutTrainer.prompt_seeds`), so its completions do not depend on which rank generates them.
Token-weighted diagnostics (entropy, KL, clip ratios, per-source CoVRL means) are means of the
ranks' means and are not compared (docs/distributed.md).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reasoning.models.latent_thought import build_latent_thought_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "distributed" / "dp_runner.py"
CONFIG = ROOT / "recipes" / "accelerate" / "multi_gpu.yaml"  # the shipped DDP config, on CPU
sys.path.insert(0, str(RUNNER.parent))
import dp_runner  # noqa: E402

# Metrics that are means over samples (equal counts per rank) or maxima: equal to one process's.
SAMPLE_METRICS = (
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "completions/mean_length",
    "completions/max_length",
    "completions/truncated_ratio",
    "rewards/digit_share/mean",
    "rewards/digit_share/std",
    "learning_rate",
)
FAMILY_METRICS = {
    "grpo": (),
    "covrl": ("hybrid/prior_fraction", "well_formed"),  # trace_length: over non-truncated rows only
    "bayes": ("bayes/log_z", "bayes/z", "bayes/reward"),
    "gflownet": ("gfn/log_z", "gfn/log_reward", "gfn/behaviour_temperature", "loss/tb"),
}
# The Bayes (KL-RL) loss and gradient are sums of terms A·log π, A·∇log π with pseudo-rewards A of
# size ~10² that largely cancel: float32 noise of the per-sequence log-probs (batch shapes differ)
# shows at ~1e-5 relative in the loss and gradient norm; the weights still agree to ~1e-7.
LOSS_RTOL = {"bayes": 1e-4}


def _close(a: float, b: float, rtol: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=rtol)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_match_one_process_for_every_family(trained_tiny_dir, tmp_path):
    latent = tmp_path / "latent"
    build_latent_thought_checkpoint(
        latent, seed=0, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, latents_per_layer=4
    )
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
        str(RUNNER), str(tmp_path / "two"), str(trained_tiny_dir), str(latent),
    ]  # fmt: skip
    result = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]

    for family in dp_runner.FAMILIES:  # the single-process reference, in this process
        dp_runner.run_family(family, str(trained_tiny_dir), str(latent), tmp_path / "one")

    for family in dp_runner.FAMILIES:
        one = torch.load(tmp_path / "one" / family / "rank0.pt", weights_only=False)
        ranks = [torch.load(tmp_path / "two" / family / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert one["world_size"] == 1 and all(r["world_size"] == 2 for r in ranks), family
        two = ranks[0]
        initial = latent if family == "latent_thought" else trained_tiny_dir
        start = _initial_weights(initial)
        moved = max((one["weights"][k] - start[k]).abs().max().item() for k in start)
        assert moved > 1e-3, f"{family}: training did not move the weights ({moved})"
        worst = max((one["weights"][k] - two["weights"][k]).abs().max().item() for k in one["weights"])
        assert worst < 1e-5, f"{family}: 2-process weights differ from 1-process by {worst}"
        for k in two["weights"]:
            assert torch.equal(two["weights"][k], ranks[1]["weights"][k]), f"{family}: ranks disagree on {k}"
        assert set(one["state"]) == set(two["state"]), family
        for key, value in one["state"].items():
            other, rank1 = two["state"][key], ranks[1]["state"][key]
            if torch.is_tensor(value):
                assert torch.equal(other, rank1), f"{family}: ranks disagree on {key}"
                assert torch.allclose(value.double(), other.double(), rtol=1e-5, atol=1e-5), (family, key)
            else:
                assert other == rank1 and _close(value, other), (family, key, value, other)
        steps_one = [e for e in one["log_history"] if "loss" in e]
        steps_two = [e for e in two["log_history"] if "loss" in e]
        assert len(steps_one) == len(steps_two) == 2, family
        names = ("loss", "grad_norm", *(() if family in ("sft", "latent_thought") else SAMPLE_METRICS))
        names = (*names, *FAMILY_METRICS.get(family, ()))
        for a, b in zip(steps_one, steps_two):
            for name in names:
                noisy = ("loss", "grad_norm", *FAMILY_METRICS.get(family, ()))  # the Ẑ estimates too
                rtol = LOSS_RTOL.get(family, 1e-5) if name in noisy else 1e-5
                assert _close(a[name], b[name], rtol), (
                    f"{family} step {a['step']}: {name} {a[name]} vs {b[name]}"
                )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_match_one_process_with_token_budget_chunks(trained_tiny_dir, tmp_path):
    """GRPO with `max_tokens_per_microbatch`: each rank plans its own rows, so a micro-step is a different
    number of chunks on each rank (no_sync for all but the last, the non-finite check reduced once per
    micro-step); the weights, loss and gradient norm are still the single process's."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
        str(RUNNER), str(tmp_path / "two"), str(trained_tiny_dir), "-", "grpo_budget",
    ]  # fmt: skip
    result = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    dp_runner.run_family("grpo_budget", str(trained_tiny_dir), "-", tmp_path / "one")

    one = torch.load(tmp_path / "one" / "grpo_budget" / "rank0.pt", weights_only=False)
    ranks = [torch.load(tmp_path / "two" / "grpo_budget" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert one["world_size"] == 1 and all(r["world_size"] == 2 for r in ranks)
    # the ranks' micro-steps really are different numbers of chunks (so the comparison below means something)
    counts = [[len(m) for m in rank["chunks"]] for rank in ranks]
    assert len(counts[0]) == len(counts[1]) == 4 and counts[0] != counts[1], (ranks[0]["chunks"], ranks[1]["chunks"])
    start = _initial_weights(trained_tiny_dir)
    moved = max((one["weights"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3, f"training did not move the weights ({moved})"
    worst = max((one["weights"][k] - ranks[0]["weights"][k]).abs().max().item() for k in one["weights"])
    assert worst < 1e-5, f"2-process weights differ from 1-process by {worst}"
    for k in ranks[0]["weights"]:
        assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]), f"ranks disagree on {k}"
    steps_one = [e for e in one["log_history"] if "loss" in e]
    steps_two = [e for e in ranks[0]["log_history"] if "loss" in e]
    assert len(steps_one) == len(steps_two) == 2
    for a, b in zip(steps_one, steps_two):
        for name in ("loss", "grad_norm", *SAMPLE_METRICS):
            assert _close(a[name], b[name]), f"step {a['step']}: {name} {a[name]} vs {b[name]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _initial_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied
    return weights


@pytest.mark.slow
def test_accelerate_launch_runs_a_recipe_on_two_ranks(tmp_path, run_cli):
    """The user path on CPU: `accelerate launch --config_file recipes/accelerate/multi_gpu.yaml
    --num_processes 2 -m reasoning train RECIPE`. Both ranks train (one RNG state each in the
    checkpoint); the tiny initial model is built once although both ranks run the recipe; rank 0
    alone evaluates and writes the summary."""
    launcher = [
        "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(_free_port()), "-m", "reasoning",
    ]  # fmt: skip
    out = tmp_path / "run"
    result = run_cli(
        "train",
        "recipes/demo/sft.yaml",
        f"--training.output_dir={out}",
        "--training.max_steps=2",
        "--training.save_steps=2",
        "--training.per_device_train_batch_size=8",
        "--data.train=synthetic:addition?n=300&split=train",
        "--eval.limit=8",
        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
        module=launcher,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_state_*.pth")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    assert (out / "final" / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("init*")) == ["init"]  # no rank's leftover build folder
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"] is not None and (out / "eval" / "final" / "results.json").exists()
