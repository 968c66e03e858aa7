"""Failing reward functions (fail fast with the sample, or skip and count) and NaN/inf losses."""

import asyncio
import math

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from reasoning.data.datasets import load_records
from reasoning.models.latent_inference import tokenize_texts
from reasoning.models.latent_thought import build_latent_thought_model
from reasoning.models.tiny import build_char_tokenizer, build_tiny_model
from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.testing import cpu_training_args
from reasoning.trainers.base import (
    GroupBatchSampler,
    NonFiniteLossError,
    RewardFunctionError,
    call_reward_functions,
)
from reasoning.trainers.bayes import BayesConfig, BayesTrainer
from reasoning.trainers.gflownet import GFlowNetConfig, GFlowNetTrainer
from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer
from reasoning.trainers.latent_thought import DualRateConfig, LatentThoughtCollator, LatentThoughtTrainer
from reasoning.trainers.sft import SFTConfig, make_sft_trainer

PROMPTS = ["1+1", "2+2", "3+3", "4+4"]
COMPLETIONS = ["2", "4", "six", "8"]
ANSWERS = ["2", "4", "6", "8"]


def call(functions, on_failure="raise", failures=None):
    return call_reward_functions(
        functions,
        PROMPTS,
        COMPLETIONS,
        [[1]] * 4,
        {"answer": ANSWERS},
        on_failure=on_failure,
        failures=failures,
    )


def parse_int(completions, **_):
    return [float(int(c)) for c in completions]  # raises on "six"


def nan_on_six(completions, **_):
    return [math.nan if c == "six" else 1.0 for c in completions]


def text_reward(completions, **_):
    return ["good" if c == "six" else 1.0 for c in completions]


def too_short(completions, **_):
    return [1.0]


def always_none(completions, **_):
    return [None if c == "six" else 1.0 for c in completions]


async def async_raises(completions, **_):
    await asyncio.sleep(0)
    return [1.0 / (c != "six") for c in completions]


@pytest.mark.parametrize(
    "function, problem",
    [
        (parse_int, r"raised ValueError: invalid literal"),
        (async_raises, r"raised ZeroDivisionError"),
        (nan_on_six, r"returned nan"),
        (text_reward, r"returned 'good' \(a str, not a number\)"),
    ],
)
def test_fail_fast_shows_the_offending_sample(function, problem):
    with pytest.raises(
        RewardFunctionError,
        match=problem + r".* on sample 2 of 4 \(prompts='3\+3', "
        r"completions='six', answer='6'\).*reward_failures: skip",
    ):
        call([function])


def test_wrong_length_fails_every_sample_and_skip_counts_them():
    with pytest.raises(RewardFunctionError, match="returned 1 values for 4 completions on sample 0 of 4"):
        call([too_short])
    failures = {}
    table = call([too_short, nan_on_six], on_failure="skip", failures=failures)
    assert failures == {"too_short": 4, "nan_on_six": 1}
    assert torch.isnan(table[:, 0]).all()
    assert table[:, 1].tolist()[:2] == [1.0, 1.0] and math.isnan(table[2, 1])


def test_skip_keeps_the_samples_that_work():
    failures = {}
    table = call([parse_int, async_raises], on_failure="skip", failures=failures)
    assert failures == {"parse_int": 1, "async_raises": 1}
    assert table[:, 0].tolist()[:2] == [2.0, 4.0] and table[3, 0] == 8.0 and math.isnan(table[2, 0])
    assert math.isnan(table[2, 1]) and table[3, 1] == 1.0


def test_none_is_not_applicable_unless_no_function_applies():
    table = call([always_none, parse_int], on_failure="skip", failures=(failures := {}))
    assert failures == {"parse_int": 1} and math.isnan(table[2, 0]) and table[2, 1].isnan()
    with pytest.raises(RewardFunctionError, match="no reward function scored sample 2 of 4"):
        call([always_none])
    table = call([always_none], on_failure="skip", failures=(failures := {}))
    assert failures == {"no_reward": 1}


# ---------------------------------------------------------------------------------- in a trainer


def make_trainer(tmp_path, reward, trainer_class=GRPOTrainer, max_steps=3, accumulation=1, **config):
    model, tokenizer = build_tiny_model("1m", seed=0)
    args = cpu_training_args(
        tmp_path,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
    )
    config_class = GFlowNetConfig if trainer_class is GFlowNetTrainer else GRPOConfig
    return trainer_class(
        model=model,
        args=args,
        config=config_class(num_generations=4, log_completions=False, **config),
        train_dataset=load_records("synthetic:addition?digits=2&n=16&seed=0&split=train"),
        processing_class=tokenizer,
        reward_funcs=[reward],
        engine=HFEngine(model=model, tokenizer=tokenizer),
        sampling=Sampling(temperature=1.0, max_tokens=8, seed=0),
    )


def flaky_reward(completions, answer, **_):
    """Raises on the first prompt's answer (the test's stand-in for a crashing verifier)."""
    return [1.0 / (a != flaky_reward.bad) for a in answer]


def test_trainer_fails_fast_or_skips_and_logs_the_count(tmp_path):
    trainer = make_trainer(tmp_path / "raise", flaky_reward, max_steps=1)
    data = trainer.train_dataset
    # the prompts of the first two generations, drawn as the trainer draws them
    batches = list(GroupBatchSampler(len(data), trainer.prompts_per_generation, repeats=1, seed=0))[:2]
    flaky_reward.bad = data[batches[0][0]]["answer"]
    with pytest.raises(RewardFunctionError, match=r"'flaky_reward' raised ZeroDivisionError.*answer="):
        trainer.train()
    trainer = make_trainer(tmp_path / "skip", flaky_reward, max_steps=2, reward_failures="skip")
    trainer.train()
    logged = [e["rewards/failures"] for e in trainer.state.log_history if "rewards/failures" in e]
    expected = [4.0 * sum(data[i]["answer"] == flaky_reward.bad for i in batch) for batch in batches]
    assert logged == expected and expected[0] >= 4
    assert trainer.state.global_step == 2


def always_nan(completions, **_):
    return [math.nan] * len(completions)


def test_gflownet_rewards_follow_the_option(tmp_path):
    """GFlowNet scores each completion for the logs (`score`) and again for log R in its loss: both
    calls honour reward_failures (the second one used to fail fast whatever the option)."""
    trainer = make_trainer(tmp_path, always_nan, trainer_class=GFlowNetTrainer, reward_failures="skip")
    rows = next(iter(trainer.get_train_dataloader()))
    trainer._replay_flags = [False] * len(rows)
    groups = trainer.generate(rows)
    batch = trainer.build_batch(rows, groups, trainer.score(rows, groups))
    n = len(rows) * 4
    assert trainer._metrics["rewards/failures"] == [n, n]
    assert trainer._metrics["rewards/always_nan/failures"] == [n, n]
    # every reward failed: each completion gets the floor, log R = log reward_floor (reward temperature 1)
    assert torch.allclose(batch["log_reward"], torch.full((n,), math.log(trainer.config.reward_floor)))


def odd_feature(completions, **_):
    """A moment feature that fails (NaN) on the first sample of every call."""
    return [math.nan if i == 0 else float(i % 2) for i in range(len(completions))]


@pytest.mark.parametrize("option", ["raise", "skip"])
def test_bayes_feature_functions_follow_the_option(tmp_path, option):
    model, tokenizer = build_tiny_model("1m", seed=0)
    trainer = BayesTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none", use_cpu=True
        ),
        config=BayesConfig(
            num_generations=4,
            target="moments",
            moment_features=["odd"],
            moment_targets=[0.5],
            moment_fit_samples=8,
            reward_failures=option,
        ),
        train_dataset=load_records("synthetic:addition?digits=2&n=16&seed=0&split=train"),
        processing_class=tokenizer,
        reward_funcs=[lambda completions, **_: [1.0] * len(completions)],
        engine=HFEngine(model=model, tokenizer=tokenizer),
        sampling=Sampling(temperature=1.0, max_tokens=8, seed=0),
        feature_funcs={"odd": odd_feature},
    )
    if option == "raise":
        with pytest.raises(RewardFunctionError, match="'odd_feature' returned nan on sample 0 of 8"):
            trainer.fit_moments()
        return
    lambdas = trainer.fit_moments()
    assert torch.isfinite(lambdas).all()  # the failed value counts as 0, not NaN
    assert trainer._metrics["rewards/failures"] == [1] and trainer._metrics["rewards/odd_feature/failures"] == [1]


# ------------------------------------------------------------------------- NaN / inf losses


class NaNInjector(TrainerCallback):
    """Makes the input embeddings NaN in the first micro-batch of the optimizer steps in `steps` (a
    stand-in for an overflow: the real loss of that micro-batch becomes NaN) and snapshots the
    weights, the optimizer state and the scheduler's step count after every optimizer step."""

    def __init__(self, trainer, steps):
        self.trainer, self.steps, self.micro, self.snapshots = trainer, set(steps), 0, []
        trainer.add_callback(self)
        trainer.model.get_input_embeddings().register_forward_hook(self.hook)
        self.initial = self.snapshot(trainer.model, None, None)

    def hook(self, module, args, output):
        if module.training and torch.is_grad_enabled() and self.micro == 0:  # not while generating
            if self.trainer.state.global_step in self.steps:
                return output * math.nan
        return None

    def on_step_begin(self, args, state, control, **kwargs):
        self.micro = 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro += 1

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.snapshots.append(self.snapshot(model, optimizer, lr_scheduler))

    @staticmethod
    def snapshot(model, optimizer, scheduler):
        state = optimizer.state_dict()["state"] if optimizer is not None else {}
        return {
            "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
            "optimizer": {(i, k): v.clone() for i, s in state.items() for k, v in s.items()},
            "scheduler_steps": scheduler.last_epoch if scheduler is not None else 0,
        }


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def grpo_trainer(tmp_path, limit):
    return make_trainer(
        tmp_path,
        lambda completions, **_: [float(len(c)) for c in completions],
        accumulation=2,
        max_nonfinite_losses=limit,
    )


def sft_trainer(tmp_path, limit):
    model, tokenizer = build_tiny_model("1m", seed=0)
    return make_sft_trainer(
        model,
        tokenizer,
        load_records("synthetic:addition?digits=2&n=48&seed=0&split=train"),
        guard_args(tmp_path),
        SFTConfig(max_nonfinite_losses=limit),
    )


def latent_trainer(tmp_path, limit):
    tokenizer = build_char_tokenizer()
    records = load_records("synthetic:addition?digits=2&n=48&seed=0&split=train")
    texts = [f"{r['question']}={r['solution']}={r['answer']}" for r in records]
    return LatentThoughtTrainer(
        model=build_latent_thought_model(vocab_size=258, seed=0, **LATENT),
        args=guard_args(tmp_path),
        train_dataset=tokenize_texts(texts, tokenizer),
        data_collator=LatentThoughtCollator(pad_id=0),
        dual_rate=DualRateConfig(fast_steps=2, max_nonfinite_losses=limit),
    )


LATENT = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "latents_per_layer": 4}


def guard_args(tmp_path, max_steps=3):
    return cpu_training_args(
        tmp_path, max_steps=max_steps, per_device_train_batch_size=8, gradient_accumulation_steps=2, learning_rate=1e-2
    )


@pytest.mark.parametrize("build", [grpo_trainer, sft_trainer, latent_trainer], ids=["grpo", "sft", "latent"])
def test_nonfinite_loss_skips_the_whole_optimizer_step_then_stops(tmp_path, build):
    """Gradient accumulation 2, NaN in the first micro-batch of step 1: that optimizer step changes no
    weight and no AdamW state (step counter, moments), although its second micro-batch was finite; the
    scheduler still advances; the steps around it train. NaN in every step: stops after the limit."""
    trainer = build(tmp_path / "once", 3)
    injected = NaNInjector(trainer, steps={1})
    trainer.train()
    assert trainer.state.global_step == 3
    first, skipped, last = injected.snapshots
    assert same(first["weights"], skipped["weights"]) and same(first["optimizer"], skipped["optimizer"])
    assert not same(injected.initial["weights"], first["weights"])  # the steps around it did train
    assert not same(skipped["weights"], last["weights"]) and not same(skipped["optimizer"], last["optimizer"])
    assert [s["scheduler_steps"] for s in injected.snapshots] == [1, 2, 3]
    logged = [e["train/nonfinite_loss_skipped"] for e in trainer.state.log_history if "loss" in e]
    assert logged == [0.0, 1.0, 0.0]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    trainer = build(tmp_path / "always", 2)
    trainer.args.max_steps = 10
    injected = NaNInjector(trainer, steps=range(100))
    with pytest.raises(NonFiniteLossError, match="NaN/inf .* in 3 optimizer steps in a row"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert [s["optimizer"] for s in injected.snapshots] == [{}, {}]  # AdamW never stepped
    assert same(injected.initial["weights"], injected.snapshots[-1]["weights"])
