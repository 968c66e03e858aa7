"""One-step-off rollouts on the real stack: GRPO on the in-process vLLM engine with `max_staleness: 1`.

- The batch trained at step t ≥ 1 was sampled from the weights after step t − 1: the engine's log-probs
  of its tokens are those of that snapshot (scored by the trainer), not of the weights training on it;
  the logged staleness is 0 for the first (synchronous) generation, then 1; the loss logs the weights.
- The background thread changes nothing but the timing: the same run with the prefetch made inline
  (in the trainer's thread, at the same point) ends with bit-identical weights.
- A checkpoint written while a generation is ahead stores it: resuming from it ends with the
  uninterrupted run's weights, and the resumed run does not sample that generation again.
"""

from __future__ import annotations

import math
import threading

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from reasoning.data.datasets import load_records
from reasoning.models.scoring import completion_logprobs
from reasoning.rewards.verifier import correctness
from reasoning.rollout import Sampling
from reasoning.testing import cpu_training_args
from reasoning.trainers.checkpoint import EXTRA_STATE, load_state_file
from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer


def digit_share(completions, **_):
    """The share of digits in a completion: varies within every group, so advantages are not all 0."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


class Snapshots(TrainerCallback):
    """The policy's weights at the start of every optimizer step (θ_t for step t)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


class RecordingGRPO(GRPOTrainer):
    """GRPO that keeps each generation's batch (and the step it trains at) for inspection."""

    def build_batch(self, rows, groups, rewards):
        batch = super().build_batch(rows, groups, rewards)
        self.batches.append((self.state.global_step, {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}))
        return batch


def make_trainer(path, output_dir, engine, max_staleness=1, max_steps=4, save_steps=100):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = cpu_training_args(
        output_dir, max_steps=max_steps, per_device_train_batch_size=8, learning_rate=3e-3,
        lr_scheduler_type="constant", save_strategy="steps", save_steps=save_steps,
    )  # fmt: skip
    snapshots = Snapshots()
    trainer = RecordingGRPO(
        model=model,
        args=args,
        config=GRPOConfig(num_generations=4, loss_type="dapo", max_staleness=max_staleness, is_truncation=2.0),
        train_dataset=load_records("synthetic:addition?digits=3&n=64&seed=3&split=train"),
        processing_class=tokenizer,
        reward_funcs=[correctness, digit_share],
        engine=engine,
        sampling=Sampling(temperature=1.0, max_tokens=24, seed=0),
        callbacks=[snapshots],
    )
    trainer.batches = []
    return trainer, snapshots


def logprobs_under(trainer, weights, batch):
    model = trainer.accelerator.unwrap_model(trainer.model)
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, batch, trainer.warpers)
    model.load_state_dict(current)
    return logp


def logged(trainer, name):
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def final_weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_step_t_trains_on_rollouts_of_the_weights_after_step_t_minus_1(trained_tiny_dir, vllm_engine, tmp_path):
    trainer, snapshots = make_trainer(trained_tiny_dir, tmp_path / "run", vllm_engine)
    assert trainer.rollout_prefetch.background  # the vLLM engine generates in a thread
    trainer.train()
    assert [step for step, _ in trainer.batches] == [0, 1, 2, 3]
    assert logged(trainer, "sampling/staleness") == [0, 1, 1, 1]
    assert trainer.sync_count == 3  # θ_0 (steps 0 and 1's rollouts), θ_1, θ_2; none for after the last step
    for step, batch in trainer.batches:
        mask = batch["completion_mask"].bool()
        behaviour = batch["engine_logprobs"][mask]
        sampled_by = snapshots.weights[max(step - 1, 0)]
        gap = (logprobs_under(trainer, sampled_by, batch)[mask] - behaviour).abs().max().item()
        assert gap < 2e-4, f"step {step}: the engine's log-probs are not those of θ_{max(step - 1, 0)} ({gap})"
        if step > 0:  # and the weights that train on the batch have moved on
            lag = (logprobs_under(trainer, snapshots.weights[step], batch)[mask] - behaviour).abs().max().item()
            assert lag > 50 * gap, (step, lag, gap)
    weights = logged(trainer, "off_policy/weight_mean")
    assert len(weights) == 4 and all(math.isfinite(w) and w > 0 for w in weights)
    assert logged(trainer, "off_policy/truncated") and logged(trainer, "time/generation_wait")


def test_the_thread_changes_only_the_timing(trained_tiny_dir, vllm_engine, tmp_path, monkeypatch):
    threads = []
    generate = vllm_engine.generate

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return generate(*args, **kwargs)

    monkeypatch.setattr(vllm_engine, "generate", spy)
    threaded, _ = make_trainer(trained_tiny_dir, tmp_path / "threaded", vllm_engine, max_steps=3)
    threaded.train()
    assert threads[0] == "MainThread" and all(n.startswith("rollout-prefetch") for n in threads[1:]), threads
    assert len(threads) == 3
    threads.clear()
    inline, _ = make_trainer(trained_tiny_dir, tmp_path / "inline", vllm_engine, max_steps=3)
    inline.rollout_prefetch.background = False  # the same prefetch, made in the trainer's thread
    inline.train()
    assert threads == ["MainThread"] * 3
    a, b = final_weights(threaded), final_weights(inline)
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = AutoModelForCausalLM.from_pretrained(trained_tiny_dir).state_dict()
    assert max((a[k] - start[k]).abs().max().item() for k in start) > 1e-4  # it trained


def test_resume_from_a_checkpoint_with_a_generation_ahead_equals_the_uninterrupted_run(
    trained_tiny_dir, vllm_engine, tmp_path
):
    whole, _ = make_trainer(trained_tiny_dir, tmp_path / "whole", vllm_engine, save_steps=2)
    whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    saved = load_state_file(checkpoint / EXTRA_STATE.format(rank=0))["prefetch"]
    assert saved["request"]["cycle"] == 2 and saved["request"]["version"] == 1  # step 2's, from θ_1
    assert len(saved["groups"]) == 2 and len(saved["groups"][0]) == 4
    resumed, _ = make_trainer(trained_tiny_dir, tmp_path / "resumed", vllm_engine, save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert [step for step, _ in resumed.batches] == [2, 3]
    assert resumed.sync_count == 1  # θ_2 for step 3 only: step 2's rollouts came from the checkpoint
    a, b = final_weights(whole), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for (_, ours), (_, theirs) in zip(resumed.batches, whole.batches[2:]):
        assert torch.equal(ours["completion_ids"], theirs["completion_ids"])
