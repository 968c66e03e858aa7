"""Per-prompt seeds: a prompt's completions depend on the prompt and its seed, not on its batch-mates.

This is what lets a data-parallel trainer give each prompt the same completions whichever rank (and
whichever slice of the batch) generates it (`RolloutTrainer.prompt_seeds`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine

QUESTIONS = ["Q:123+456\nT:", "Q:905+77\nT:", "Q:31+640\nT:", "Q:808+191\nT:"]
SAMPLING = Sampling(temperature=1.0, max_tokens=24, seed=7)


def _ids(groups) -> list[list[list[int]]]:
    return [[r.completion_ids for r in group] for group in groups]


def _check_engine(engine, prompts: list[list[int]]) -> None:
    seeds = [101, 202, 303, 404]
    everything = engine.generate(prompts, SAMPLING, n=3, seeds=seeds)
    # the last two prompts alone, in another order: the same completions as in the full batch
    alone = engine.generate([prompts[3], prompts[2]], SAMPLING, n=3, seeds=[404, 303])
    assert _ids(alone) == [_ids(everything)[3], _ids(everything)[2]]
    # the seed matters: the same prompt under two seeds gets different groups
    twice = engine.generate([prompts[0], prompts[0]], SAMPLING, n=3, seeds=[101, 999])
    assert _ids(twice)[0] == _ids(everything)[0] and _ids(twice)[1] != _ids(twice)[0]
    assert all(r.prompt_ids == prompts[0] for r in twice[1])
    with pytest.raises(ValueError, match="one seed per prompt"):
        engine.generate(prompts, SAMPLING, n=1, seeds=seeds[:2])


def test_hf_engine_samples_each_seeded_prompt_independently(trained_tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
    prompts = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    _check_engine(HFEngine(model=model, tokenizer=tokenizer), prompts)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_samples_each_seeded_prompt_independently(vllm_engine, trained_tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32)
    vllm_engine.sync_weights(model)  # the shared engine may hold another test's weights
    prompts = [vllm_engine.tokenizer(q, add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    _check_engine(vllm_engine, prompts)
    # a prompt without room for one completion token in max_model_len is refused before generating
    too_long = [prompts[0][0]] * vllm_engine.max_model_len
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens; the engine's max_model_len is .*engine_kwargs"):
        vllm_engine.generate([prompts[0], too_long], SAMPLING, n=1)
