"""Model roles of `RolloutTrainer` on the real stack: frozen models (copy, disabled LoRA adapter, given
model) and side parameters (stepped with the policy or by hand; checkpoint round trips)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning.data.datasets import load_records
from reasoning.models.lora import apply_lora
from reasoning.models.scoring import Warpers, completion_logprobs
from reasoning.rewards.verifier import correctness
from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.testing import cpu_training_args
from reasoning.trainers.base import LossOutput
from reasoning.trainers.checkpoint import latest_complete_checkpoint
from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer

DATA = "synthetic:addition?digits=3&n=64&seed=3&split=train"


def length_reward(prompts, completions, **columns):
    """Varies within every group, so the policy moves."""
    return [-len(c) / 10 for c in completions]


class HeadTrainer(GRPOTrainer):
    """GRPO plus a scalar head pulled towards 3 (policy-stepped) and one stepped by hand."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.head.weight)
        self.side = self.add_side_parameters("head", self.head, lr=0.1)
        self.manual_head = torch.nn.Linear(1, 1, bias=False)
        self.manual = self.add_side_parameters(
            "manual", self.manual_head, lr=0.05, step="manual", max_grad_norm=1.0
        )

    def loss(self, model, batch):
        out = super().loss(model, batch)
        pull = (self.head.weight.sum() - 3.0) ** 2
        return LossOutput(out.value + pull, {**out.metrics, "head": self.head.weight.sum().detach()})


def make_trainer(path, output_dir, cls=GRPOTrainer, model=None, beta=0.04, max_steps=2, **args):
    model = model or AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    values = dict(max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-2, lr_scheduler_type="constant")
    return cls(
        model=model,
        args=cpu_training_args(output_dir, **{**values, **args}),
        config=GRPOConfig(num_generations=4, loss_type="grpo", beta=beta),
        train_dataset=load_records(DATA),
        processing_class=tokenizer,
        reward_funcs=[correctness, length_reward],
        engine=HFEngine(model=model, tokenizer=tokenizer),
        sampling=Sampling(temperature=1.0, max_tokens=24, seed=0),
    )


def one_batch(trainer):
    rows = [trainer.train_dataset[i] for i in range(2)]
    groups = trainer.generate(rows)
    return trainer.collate_rollouts(groups)


def test_frozen_copy_keeps_the_starting_policy(trained_tiny_dir, tmp_path):
    trainer = make_trainer(trained_tiny_dir, tmp_path / "run")
    frozen = trainer.reference
    assert not frozen.adapter and frozen.module is not trainer.model
    assert not any(p.requires_grad for p in frozen.parameters())
    batch = one_batch(trainer)
    before = frozen.logprobs(batch)
    with torch.no_grad():
        policy, _ = completion_logprobs(trainer.model, batch, trainer.warpers)
    torch.testing.assert_close(before, policy, atol=1e-6, rtol=0)  # the copy equals the policy at the start
    trainer.train()
    torch.testing.assert_close(frozen.logprobs(batch), before, atol=0, rtol=0)  # and stays frozen
    with torch.no_grad():
        moved, _ = completion_logprobs(trainer.model, batch, trainer.warpers)
    assert (moved - before).abs().max() > 1e-4
    given = trainer.frozen_model(AutoModelForCausalLM.from_pretrained(trained_tiny_dir))
    torch.testing.assert_close(given.logprobs(batch), before, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="PEFT"):
        trainer.frozen_model(kind="adapter")


def test_frozen_adapter_is_the_base_of_a_lora_policy(trained_tiny_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
    policy = apply_lora(AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32), {"r": 4})
    trainer = make_trainer(trained_tiny_dir, tmp_path / "run", model=policy, learning_rate=5e-2)
    assert trainer.reference.adapter and trainer.reference.module is policy
    batch = one_batch(trainer)
    trainer.train()
    with torch.no_grad():
        want, _ = completion_logprobs(base, batch, trainer.warpers)
        adapted, _ = completion_logprobs(policy, batch, trainer.warpers)
    torch.testing.assert_close(trainer.reference.logprobs(batch), want, atol=1e-6, rtol=0)
    assert (adapted - want).abs().max() > 1e-4  # the adapter trained; the base did not
    assert policy.training  # the scope restores the policy's mode


def test_side_parameters_train_at_their_rate_and_survive_a_checkpoint(trained_tiny_dir, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(
        trained_tiny_dir, run, cls=HeadTrainer, beta=0.0, max_steps=2, save_strategy="steps", save_steps=1
    )
    trainer.train()
    group = trainer.side.param_group()
    assert group["lr"] == 0.1 and group["side"] == "head" and group["weight_decay"] == 0.0
    # d/dw (w − 3)² = 2(w − 3): Adam's first steps move w by about lr each, towards 3
    value = trainer.head.weight.item()
    assert 0.15 < value < 0.25, value
    logged = [e["head"] for e in trainer.state.log_history if "head" in e]
    assert len(logged) == 2 and logged[0] == 0.0
    # a manual step: its own AdamW, clipped, counted and saved
    manual_before = trainer.manual_head.weight.detach().clone()
    (trainer.manual_head.weight.sum() * 5.0).backward()
    assert trainer.manual.step() == pytest.approx(5.0)
    assert trainer.manual.steps == 1 and not torch.equal(trainer.manual_head.weight, manual_before)
    state = trainer.checkpoint_state()["side"]
    assert (
        set(state) == {"head", "manual"}
        and "optimizer" in state["manual"]
        and "optimizer" not in state["head"]
    )

    # resume: the saved head weights come back (its optimizer state is in transformers' optimizer.pt)
    checkpoint = latest_complete_checkpoint(run)
    assert checkpoint and checkpoint.endswith("checkpoint-2")
    resumed = make_trainer(trained_tiny_dir, run, cls=HeadTrainer, beta=0.0, max_steps=2)
    resumed.restore_checkpoint_state(checkpoint)
    assert resumed.head.weight.item() == pytest.approx(value, abs=0)
    fresh = make_trainer(trained_tiny_dir, tmp_path / "other", cls=HeadTrainer, beta=0.0)
    fresh.load_checkpoint_state(trainer.checkpoint_state())
    assert torch.equal(fresh.manual_head.weight, trainer.manual_head.weight) and fresh.manual.steps == 1
    moments = fresh.manual.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(moments, trainer.manual.optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="already registered"):
        fresh.add_side_parameters("head", torch.nn.Linear(1, 1), lr=0.1)
    plain = make_trainer(trained_tiny_dir, tmp_path / "plain", beta=0.0)
    with pytest.raises(ValueError, match="side parameters 'head'"):
        plain.load_checkpoint_state(trainer.checkpoint_state())
    assert math.isfinite(value)


def test_warpers_follow_the_sampling(trained_tiny_dir, tmp_path):
    trainer = make_trainer(trained_tiny_dir, tmp_path / "run", beta=0.0)
    assert trainer.warpers == Warpers(1.0)
