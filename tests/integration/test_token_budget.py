"""Token-budget micro-batches in the GRPO trainer: the optimizer steps of the unbudgeted trainer.

Real stack: the briefly trained tiny model, transformers rollouts (`HFEngine`, seeded), the real
`GRPOTrainer`. One generation of 16 completions serves two optimizer steps (per-device batch 4,
gradient accumulation 2, steps_per_generation 4), so π_old is recomputed (`budget_logprobs`) and the
second step has importance ratios ≠ 1; β > 0 adds the frozen reference's no-grad pass. With a budget
of 2.5 × (the longest prompt + max_tokens), each micro-step is cut into chunks of unequal row counts (checked
on the buffer), padded and trimmed or packed into one row each. Plain SGD with no gradient clipping
(AdamW's first step is lr·sign(g) and clipping rescales: either would hide a wrong normalisation),
so the weights after two steps are the initial weights minus lr × the summed gradients: they must be
those of the run without a budget up to float32 rounding: of the different layouts (1e-5 of the
largest change) and of the stored weights themselves (2 float32 epsilons of the largest weight).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning.data.datasets import load_records
from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.testing import cpu_training_args
from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer

MAX_TOKENS = 40


def digit_share(completions, **_):
    """A dense reward (varies within groups, unlike correctness for a model this small)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def make_trainer(path, output_dir, loss_type, budget=None, padding_free="auto", cls=GRPOTrainer, **config):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = cpu_training_args(
        output_dir, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, optim="sgd",
        learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=500,
    )  # fmt: skip
    return cls(
        model=model,
        args=args,
        config=GRPOConfig(
            num_generations=4,
            steps_per_generation=4,
            loss_type=loss_type,
            beta=0.05,
            scale_rewards="none",
            log_completions=False,
            max_tokens_per_microbatch=budget,
            padding_free=padding_free,
            **config,
        ),
        train_dataset=load_records("synthetic:addition?digits=3&n=32&seed=3&split=train"),
        processing_class=tokenizer,
        reward_funcs=[digit_share],
        engine=HFEngine(model=model, tokenizer=tokenizer),
        sampling=Sampling(temperature=1.0, max_tokens=MAX_TOKENS, seed=0),
    )


def longest_prompt(trainer) -> int:
    return max(len(ids) for ids in trainer.train_dataset["prompt_ids"])


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def reference_runs(trained_tiny_dir, tmp_path_factory):
    """Per loss type: the weights after two steps without a budget, the start weights, the budget."""
    runs = {}

    def run(loss_type):
        if loss_type not in runs:
            trainer = make_trainer(trained_tiny_dir, tmp_path_factory.mktemp("ref"), loss_type)
            start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            # 2.5 longest sequences: long rows go alone, short ones share a chunk
            runs[loss_type] = (trained_weights(trainer), start, 5 * (longest_prompt(trainer) + MAX_TOKENS) // 2)
        return runs[loss_type]

    return run


@pytest.mark.parametrize("packed", [False, True], ids=["bucketed", "packed"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "rft"])
def test_budget_steps_give_the_weights_of_the_unbudgeted_steps(
    trained_tiny_dir, tmp_path, reference_runs, loss_type, packed
):
    reference, start, budget = reference_runs(loss_type)
    trainer = make_trainer(
        trained_tiny_dir, tmp_path, loss_type, budget=budget, padding_free=packed,
        **({"rft_threshold": 0.3} if loss_type == "rft" else {}),
    )  # fmt: skip
    if loss_type == "rft":  # the reference must use the same threshold
        ref_trainer = make_trainer(trained_tiny_dir, tmp_path / "ref", loss_type, rft_threshold=0.3)
        reference = trained_weights(ref_trainer)
    assert trainer.padding_free is packed
    weights = trained_weights(trainer)

    # the buffer holds the generation's 4 micro-steps: several chunks of unequal sizes, trimmed / packed
    chunk_rows = [[len(c["completion_ids"]) for c in micro["chunks"]] for micro in trainer._buffer]
    assert len(chunk_rows) == 4 and sum(map(sum, chunk_rows)) == 16, chunk_rows
    assert max(map(len, chunk_rows)) >= 2 and len({n for rows in chunk_rows for n in rows}) >= 2, chunk_rows
    for micro in trainer._buffer:
        for chunk in micro["chunks"]:
            assert ("packed" in chunk) is packed
            assert chunk["step_sequences"] == 8
            width = chunk["prompt_ids"].shape[1] + chunk["completion_ids"].shape[1]
            assert packed or len(chunk["completion_ids"]) * width <= budget

    moved = max((reference[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3, f"training did not move the weights ({moved})"
    worst = max((weights[k] - reference[k]).abs().max().item() for k in reference)
    resolution = torch.finfo(torch.float32).eps * max(v.abs().max().item() for v in reference.values())
    assert worst <= 1e-5 * moved + 2 * resolution, (
        f"{loss_type}: budget weights differ by {worst:.3g} (largest change {moved:.3g})"
    )


def test_budget_settings_are_checked_when_the_trainer_is_built(trained_tiny_dir, tmp_path):
    trainer = make_trainer(trained_tiny_dir, tmp_path, "dapo")
    needed = longest_prompt(trainer) + MAX_TOKENS
    with pytest.raises(ValueError, match=f"set it to at least {needed}"):
        make_trainer(trained_tiny_dir, tmp_path, "dapo", budget=needed - 1)
    with pytest.raises(ValueError, match="set max_tokens_per_microbatch too"):
        make_trainer(trained_tiny_dir, tmp_path, "dapo", padding_free=True)
    with pytest.raises(ValueError, match="padding_free must be true, false or 'auto'"):
        make_trainer(trained_tiny_dir, tmp_path, "dapo", budget=needed, padding_free="yes")
    # a trainer whose loss is not written as chunk shares
    no_shares = type("PerChunkMeans", (GRPOTrainer,), {"supports_token_budget": False})
    with pytest.raises(ValueError, match="PerChunkMeans does not support max_tokens_per_microbatch"):
        make_trainer(trained_tiny_dir, tmp_path, "dapo", budget=needed, cls=no_shares)
    # auto packs only with a varlen (flash) backend: not this sdpa model
    assert make_trainer(trained_tiny_dir, tmp_path, "dapo", budget=needed).padding_free is False
