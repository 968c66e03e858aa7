"""The GRPO trainer end to end on real engines: sync accounting, rewards, logs, checkpoints, resume."""

import asyncio
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from reasoning.data.datasets import load_records
from reasoning.rewards.verifier import correctness
from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer

SEEN_COLUMNS = []


def spy_reward(prompts, completions, completion_ids, answer, task, trainer_state, **columns):
    """Checks the TRL-style signature: dataset columns arrive per completion."""
    assert len(prompts) == len(completions) == len(completion_ids) == len(answer) == len(task)
    SEEN_COLUMNS.append(sorted(["answer", "task", *columns]))
    return [None if i % 2 else float(len(c) < 40) for i, c in enumerate(completions)]


async def async_length_reward(prompts, completions, **columns):
    await asyncio.sleep(0)
    return [-len(c) / 100 for c in completions]


def make_trainer(
    path, output_dir, engine=None, max_steps=3, steps_per_generation=None, sampling=None, **args
):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    training = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **args,
    )
    return GRPOTrainer(
        model=model,
        args=training,
        config=GRPOConfig(
            num_generations=4, steps_per_generation=steps_per_generation, loss_type="grpo", beta=0.04
        ),
        train_dataset=load_records("synthetic:addition?digits=3&n=64&seed=3&split=train"),
        processing_class=tokenizer,
        reward_funcs=[correctness, spy_reward, async_length_reward],
        reward_weights=[1.0, 0.5, 0.1],
        engine=engine or HFEngine(model=model, tokenizer=tokenizer),
        sampling=sampling or Sampling(temperature=1.0, max_tokens=40, seed=0),
    )


def test_top_p_sampling_is_refused_when_scores_ignore_it(trained_tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="top_k 0 and top_p 1"):
        make_trainer(trained_tiny_dir, tmp_path / "run", sampling=Sampling(temperature=1.0, top_p=0.9))


def test_training_steps_sync_once_per_generation_and_log(trained_tiny_dir, tmp_path):
    trainer = make_trainer(trained_tiny_dir, tmp_path / "run", max_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.sync_count == 3  # one generation per optimizer step
    assert trainer.state.global_step == 3
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert logs and {
        "rewards/correctness/mean",
        "rewards/spy_reward/mean",
        "kl",
        "entropy",
        "completions/mean_length",
        "clip_ratio/region",
        "time/generation",
    } <= set(logs[0])
    assert SEEN_COLUMNS and {"a", "b", "id", "question", "solution"} <= set(SEEN_COLUMNS[-1])
    lines = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 8 * 2 and {"prompt", "completion", "reward", "rewards", "advantage"} <= set(
        lines[0]
    )
    assert lines[0]["rewards"]["spy_reward"] is not None and lines[1]["rewards"]["spy_reward"] is None
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_extra_state_rank0.pt").exists()


def test_one_generation_serves_two_optimizer_steps(trained_tiny_dir, tmp_path):
    trainer = make_trainer(trained_tiny_dir, tmp_path / "run", max_steps=4, steps_per_generation=4)
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.sync_count == 2


def test_resume_from_checkpoint_continues(trained_tiny_dir, tmp_path):
    first = make_trainer(trained_tiny_dir, tmp_path / "run", max_steps=2)
    first.train()
    resumed = make_trainer(trained_tiny_dir, tmp_path / "run", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert resumed._micro_step == 8  # restored (4) + two more steps of 2 micro-batches


def test_batch_arithmetic_errors_are_explained(trained_tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="not divisible by num_generations"):
        trainer = make_trainer(trained_tiny_dir, tmp_path / "run")
        GRPOTrainer(
            model=trainer.model,
            args=TrainingArguments(str(tmp_path / "x"), per_device_train_batch_size=3, report_to="none"),
            config=GRPOConfig(num_generations=4),
            train_dataset=trainer.train_dataset,
            processing_class=trainer.processing_class,
            reward_funcs=[correctness],
            engine=trainer.engine,
            sampling=Sampling(),
        )


@pytest.mark.vllm
@pytest.mark.slow
def test_grpo_with_vllm_engine(trained_tiny_dir, vllm_engine, tmp_path):
    trainer = make_trainer(trained_tiny_dir, tmp_path / "run", engine=vllm_engine, max_steps=2)
    trainer.train()
    assert trainer.sync_count == 2
    differences = [
        e["sampling/logp_difference_mean"]
        for e in trainer.state.log_history
        if "sampling/logp_difference_mean" in e
    ]
    assert differences and max(differences) < 1e-4  # the engine samples from the trainer's weights
    vllm_engine.sync_weights(AutoModelForCausalLM.from_pretrained(trained_tiny_dir))
