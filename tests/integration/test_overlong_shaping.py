"""GRPO with DAPO's soft overlong punishment beside the correctness reward, on vLLM rollouts.

The reward functions come from a recipe's `reward:` section (`reward_functions`), the run is the
real GRPO trainer on the trained tiny model with the session's vLLM engine, and the logged reward
column of every completion (`completions.jsonl`) must be DAPO Eq. 13 of its token count (what the
engine returned, recorded on the way; Eq. 13 is written out again here), while the total reward is
correctness + penalty and the logged `rewards/soft_overlong_punishment/mean` is the mean of the
generation's penalties.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning.data.datasets import load_records
from reasoning.recipes import reward_functions
from reasoning.recipes.schema import RewardConfig
from reasoning.rollout import Sampling
from reasoning.testing import cpu_training_args
from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer

MAX_TOKENS, CACHE = 40, 20  # the tiny model's scratchpads run ~25-40 tokens: across the ramp


class RecordingEngine:
    """The engine itself, noting the token count of every completion it returns, in order."""

    def __init__(self, engine) -> None:
        self.engine, self.lengths = engine, []

    def generate(self, *args, **kwargs):
        groups = self.engine.generate(*args, **kwargs)
        self.lengths.append([len(r.completion_ids) for group in groups for r in group])
        return groups

    def __getattr__(self, name):
        return getattr(self.engine, name)


def dapo_eq13(length: int, l_max: int, l_cache: int) -> float:
    """DAPO (Yu et al. 2025) Eq. 13, case by case."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


@pytest.mark.vllm
@pytest.mark.slow
def test_grpo_logs_the_soft_overlong_penalty_of_every_completion(trained_tiny_dir, vllm_engine, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_dir)
    functions = reward_functions(
        RewardConfig(functions=["correctness", "soft_overlong_punishment"], soft_punish_cache=CACHE),
        MAX_TOKENS,
    )
    trainer = GRPOTrainer(
        model=model,
        args=cpu_training_args(tmp_path, max_steps=2, per_device_train_batch_size=16),
        config=GRPOConfig(num_generations=4, loss_type="dapo", mask_truncated_completions=True),
        train_dataset=load_records("synthetic:addition?digits=3&n=64&seed=3&split=train"),
        processing_class=tokenizer,
        reward_funcs=functions,
        engine=(engine := RecordingEngine(vllm_engine)),
        sampling=Sampling(temperature=1.0, max_tokens=MAX_TOKENS, seed=0),
    )
    try:
        trainer.train()
    finally:
        vllm_engine.sync_weights(AutoModelForCausalLM.from_pretrained(trained_tiny_dir))
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(engine.lengths) == 2 and [len(g) for g in engine.lengths] == [16, 16]
    # completions.jsonl lists each generation's completions in the order the engine returned them
    assert [row["step"] for row in rows] == [0] * 16 + [1] * 16
    penalties = [[dapo_eq13(n, MAX_TOKENS, CACHE) for n in lengths] for lengths in engine.lengths]
    for row, length, expected in zip(rows, sum(engine.lengths, []), sum(penalties, []), strict=True):
        assert length <= MAX_TOKENS and (row["finish_reason"] == "stop" or length == MAX_TOKENS)
        assert row["rewards"]["soft_overlong_punishment"] == pytest.approx(expected, abs=1e-6)
        assert row["reward"] == pytest.approx(row["rewards"]["correctness"] + expected, abs=1e-6)
    values = sum(penalties, [])
    assert any(-1 < p < 0 for p in values) and min(values) < max(values)  # the ramp, not one constant
    logged = [e["rewards/soft_overlong_punishment/mean"] for e in trainer.state.log_history if "reward" in e]
    assert logged == pytest.approx([sum(p) / len(p) for p in penalties], abs=1e-6)
