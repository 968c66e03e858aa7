"""DAPO dynamic sampling in GRPO on the real stack: a tiny policy, real rollouts, the real correctness
verifier and DAPO's soft overlong punishment as a shaping reward.

The policy is the session's trained tiny model after 40 more SFT steps on one-digit addition: about a
third of its groups of 4 have a correctness that differs within the group, the rest are all wrong,
so both dropping and refilling happen every few steps (the session model alone is right about once
in a thousand samples, which would make every step a long search).

1. On the session's vLLM engine every generation batch the trainer scores is recorded (through the
   `score` hook). Each step must keep generating until its groups whose *correctness* differs fill
   the batch, drop every group whose correctness is all alike even when the shaped total
   (correctness + length penalty) differs, train on the first kept groups in generation order
   (`completions.jsonl` lists what was trained), and log `dynamic_sampling/dropped_groups`,
   `.../generated_groups` and `.../refills` that agree with the recorded batches.
2. Exact resume with it on (the `tests/integration/test_resume.py` comparison, in process, with the
   transformers engine): a run interrupted after a checkpoint that falls inside a generation cycle
   and resumed ends with the weights, trainer state and dynamic-sampling metrics of an uninterrupted
   run.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from reasoning.data.datasets import load_records
from reasoning.recipes import reward_functions
from reasoning.recipes.schema import RewardConfig
from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.testing import cpu_training_args, train_tiny_sft
from reasoning.trainers.checkpoint import EXTRA_STATE, load_state_file
from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer

G, PROMPTS, STEPS = 4, 4, 3
MAX_TOKENS, CACHE = 16, 8  # completions run ~10-14 tokens: the penalty ramp starts at 8
DATA = "synthetic:addition?digits=1&n=64&seed=3&split=train"
METRICS = ("dynamic_sampling/dropped_groups", "dynamic_sampling/generated_groups", "dynamic_sampling/refills")


@pytest.fixture(scope="module")
def one_digit_policy(trained_tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("one-digit")
    return train_tiny_sft(path, "synthetic:addition?digits=1&n=2000&seed=5&split=train", 40, start=trained_tiny_dir)


class RecordingGRPO(GRPOTrainer):
    """GRPO that notes every scored generation batch: (step, questions, completion texts, table)."""

    scored: list

    def score(self, rows, groups):
        table = super().score(rows, groups)
        texts = [[r.text for r in group] for group in groups]
        self.scored.append((self.state.global_step, [row["question"] for row in rows], texts, table.clone()))
        return table


def alike(values: list[float]) -> bool:
    return len(set(values)) == 1


def arguments(output_dir, **overrides) -> TrainingArguments:
    return cpu_training_args(output_dir, **{"max_steps": STEPS, "per_device_train_batch_size": G * PROMPTS, **overrides})


def shaped_rewards():
    config = RewardConfig(functions=["correctness", "soft_overlong_punishment"], soft_punish_cache=CACHE)
    return reward_functions(config, MAX_TOKENS)


@pytest.mark.vllm
@pytest.mark.slow
def test_zero_variance_groups_are_dropped_and_the_batch_refilled(
    one_digit_policy, trained_tiny_dir, vllm_engine, tmp_path
):
    model = AutoModelForCausalLM.from_pretrained(one_digit_policy, dtype=torch.float32)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    RecordingGRPO.scored = []
    trainer = RecordingGRPO(
        model=model,
        args=arguments(tmp_path),
        config=GRPOConfig(num_generations=G, dynamic_sampling=True, max_generation_batches=0),
        train_dataset=load_records(DATA),
        processing_class=AutoTokenizer.from_pretrained(one_digit_policy),
        reward_funcs=shaped_rewards(),
        engine=vllm_engine,
        sampling=Sampling(temperature=1.0, max_tokens=MAX_TOKENS, seed=0),
    )
    try:
        trainer.train()
    finally:
        vllm_engine.sync_weights(AutoModelForCausalLM.from_pretrained(trained_tiny_dir))

    logged = [e for e in trainer.state.log_history if "dynamic_sampling/refills" in e]
    trained = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == STEPS and len(trained) == STEPS * PROMPTS * G
    shaped_but_dropped = 0
    for step in range(STEPS):
        batches = [entry for entry in trainer.scored if entry[0] == step]
        kept, dropped = [], 0
        for _, questions, texts, table in batches:
            assert len(questions) == PROMPTS and table.shape == (PROMPTS * G, 2)
            assert len(kept) < PROMPTS  # a batch is generated only while the groups fall short
            for i, question in enumerate(questions):
                rows = table[i * G : (i + 1) * G]
                if alike(rows[:, 0].tolist()):  # correctness, the raw task metric
                    dropped += 1
                    shaped_but_dropped += not alike((rows[:, 0] + rows[:, 1]).tolist())
                else:
                    kept.append((question, texts[i], rows[:, 0].tolist()))
        assert len(kept) >= PROMPTS  # ... and the last one filled the batch
        log = logged[step]
        assert log["dynamic_sampling/refills"] == len(batches) - 1
        assert log["dynamic_sampling/dropped_groups"] == dropped
        assert log["dynamic_sampling/generated_groups"] == PROMPTS * len(batches)
        # what was trained: the first PROMPTS kept groups, in the order they were generated
        rows = [r for r in trained if r["step"] == step]
        for (question, texts, correct), first in zip(kept[:PROMPTS], range(0, len(rows), G), strict=True):
            group = rows[first : first + G]
            assert all(r["prompt"].startswith(f"Q:{question}\n") for r in group)
            assert [r["completion"] for r in group] == texts
            assert [r["rewards"]["correctness"] for r in group] == correct and not alike(correct)
            assert any(r["advantage"] != 0 for r in group)
    # the run exercised what it checks: refills, and groups dropped on correctness although their
    # shaped reward (with the length penalty) differed
    assert sum(e["dynamic_sampling/refills"] for e in logged) >= 1
    assert shaped_but_dropped >= 1
    assert max((model.state_dict()[k] - v).abs().max().item() for k, v in start.items()) > 1e-6


class StopAfter(TrainerCallback):
    """Ends training after optimizer step `step` (its checkpoint is saved first): an interrupted run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def resumable_run(policy, output_dir, callbacks=(), resume=False) -> GRPOTrainer:
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    trainer = GRPOTrainer(
        model=model,
        # a generation serves 2 optimizer steps of 8 completions: checkpoint-3 falls inside a cycle
        args=arguments(
            output_dir,
            max_steps=6,
            per_device_train_batch_size=8,
            learning_rate=1e-4,
            save_strategy="steps",
            save_steps=1,
        ),
        config=GRPOConfig(
            num_generations=G, steps_per_generation=2, dynamic_sampling=True, max_generation_batches=0
        ),
        train_dataset=load_records(DATA),
        processing_class=tokenizer,
        reward_funcs=shaped_rewards(),
        engine=HFEngine(model=model, tokenizer=tokenizer),
        sampling=Sampling(temperature=1.0, max_tokens=MAX_TOKENS, seed=0),
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer


@pytest.mark.slow
def test_resume_with_dynamic_sampling_repeats_the_uninterrupted_run(one_digit_policy, tmp_path):
    reference = resumable_run(one_digit_policy, tmp_path / "reference")
    interrupted = resumable_run(one_digit_policy, tmp_path / "resumed", callbacks=[StopAfter(3)])
    assert interrupted.state.global_step == 3
    state = load_state_file(tmp_path / "resumed" / "checkpoint-3" / EXTRA_STATE.format(rank=0))
    assert state["micro_step"] == 3 and len(state["buffer"]) == 2  # saved inside a generation cycle
    resumed = resumable_run(one_digit_policy, tmp_path / "resumed", resume=True)
    assert resumed.state.global_step == 6

    def metrics(trainer) -> list[tuple]:
        return [(e["step"], *(e[m] for m in METRICS)) for e in trainer.state.log_history if METRICS[0] in e]

    # generations at steps 0, 2 and 4 (logged after steps 1, 3 and 5); the one at 4 after the resume
    assert [m[0] for m in metrics(reference)] == [1, 3, 5]
    assert metrics(resumed) == metrics(reference)
    assert sum(m[3] for m in metrics(reference)) >= 1 and metrics(reference)[-1][2] > PROMPTS  # refills
    weights = reference.model.state_dict()
    assert max((resumed.model.state_dict()[k] - v).abs().max().item() for k, v in weights.items()) <= 1e-6
    start = AutoModelForCausalLM.from_pretrained(one_digit_policy).state_dict()
    assert max((weights[k] - start[k]).abs().max().item() for k in start) > 1e-4
    final = EXTRA_STATE.format(rank=0)
    ours = load_state_file(tmp_path / "resumed" / "checkpoint-6" / final)
    theirs = load_state_file(tmp_path / "reference" / "checkpoint-6" / final)
    assert ours["micro_step"] == theirs["micro_step"] == 6


@pytest.mark.slow
def test_a_policy_that_is_never_right_stops_with_the_numbers(trained_tiny_dir, tmp_path):
    """The session's tiny model is right about once in a thousand samples: two batches cannot fill one
    generation, and training stops naming the limit, the counts and the fixes."""
    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_dir)
    trainer = GRPOTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=1),
        config=GRPOConfig(num_generations=G, dynamic_sampling=True, max_generation_batches=2),
        train_dataset=load_records("synthetic:addition?digits=3&n=64&seed=3&split=train"),
        processing_class=tokenizer,
        reward_funcs=shaped_rewards(),
        engine=HFEngine(model=model, tokenizer=tokenizer),
        sampling=Sampling(temperature=1.0, max_tokens=MAX_TOKENS, seed=0),
    )
    with pytest.raises(
        RuntimeError,
        match=r"after 2 generation batches \(max_generation_batches\) only 0 of the 4 groups a rank needs have a "
        r"correctness that differs within the group \(8 of 8 groups were all alike\).*Raise max_generation_batches",
    ):
        trainer.train()
    with pytest.raises(
        ValueError, match=r"dynamic_sampling_metric 'accuracy' is not one of the reward functions "
    ):
        GRPOTrainer(
            model=model,
            args=arguments(tmp_path, max_steps=1),
            config=GRPOConfig(num_generations=G, dynamic_sampling=True, dynamic_sampling_metric="accuracy"),
            train_dataset=load_records(DATA),
            processing_class=tokenizer,
            reward_funcs=shaped_rewards(),
            engine=HFEngine(model=model, tokenizer=tokenizer),
            sampling=Sampling(temperature=1.0, max_tokens=MAX_TOKENS, seed=0),
        )


@pytest.mark.slow
def test_refills_do_not_drop_the_prefetched_next_generation(one_digit_policy, tmp_path, caplog):
    """With `max_staleness` the next cycle is sampled ahead. At 2 (= the cycle's steps) it is due right
    after this cycle's rollouts, and `make_batch` starts it after the refills: every cycle but the first
    trains on its prefetched batch (sampled 2 steps earlier) plus its own fresh refills."""
    model = AutoModelForCausalLM.from_pretrained(one_digit_policy, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(one_digit_policy)
    trainer = GRPOTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=4, per_device_train_batch_size=8, learning_rate=1e-4),
        config=GRPOConfig(
            num_generations=G,
            steps_per_generation=2,
            max_staleness=2,
            dynamic_sampling=True,
            max_generation_batches=0,
        ),
        train_dataset=load_records(DATA),
        processing_class=tokenizer,
        reward_funcs=shaped_rewards(),
        engine=HFEngine(model=model, tokenizer=tokenizer),
        sampling=Sampling(temperature=1.0, max_tokens=MAX_TOKENS, seed=0),
    )
    with caplog.at_level("WARNING", logger="reasoning.trainers.async_rollouts"):
        trainer.train()
    assert "sampled ahead" not in caplog.text  # no prefetched generation was dropped
    logged = [e for e in trainer.state.log_history if METRICS[0] in e]
    assert len(logged) == 2 and sum(e["dynamic_sampling/refills"] for e in logged) >= 1
    # the second cycle's first batch came from the prefetch (2 steps old), its refills are fresh (0)
    assert logged[0]["sampling/staleness"] == 0 and 0 < logged[1]["sampling/staleness"] < 2
