"""Adapter-only LoRA sync (`VLLMEngine(lora_sync="adapter")`) on the real CPU engine.

The engine applies the adapter with vLLM's LoRA layers and each sync moves only A and B: its
log-probs must equal the merged model's (W + (α/r)·B·A, computed by PEFT) within 1e-4, for greedy
and sampled completions, after each of several trained adapters; the base is pushed once, at the
first sync (so an engine started from another checkpoint still serves base + adapter); adapters
vLLM cannot serve fall back to merging with the reason logged, and still match their merged model.
A GRPO recipe with `rollout.engine_kwargs.lora_sync: adapter` trains, checkpoints and resumes to
the same weights as an uninterrupted run.
"""

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from reasoning.models.lora import apply_lora
from reasoning.models.tiny import build_tiny_model
from reasoning.recipes import load_recipe, run
from reasoning.rollout import Sampling

ROOT = Path(__file__).resolve().parents[2]
SAMPLINGS = (Sampling(temperature=0, max_tokens=16), Sampling(temperature=0.8, max_tokens=16, seed=1))
PROMPTS = ["Q:12+9\nT:", "Q:604+77\nT:", "Q:5+5\nT:"]


def largest_logprob_error(engine, reference: torch.nn.Module, prompts: list[list[int]]) -> float:
    """max |engine log-prob − reference log-prob| over the tokens of greedy and sampled completions."""
    worst = 0.0
    for sampling in SAMPLINGS:
        for group in engine.generate(prompts, sampling, n=1 if sampling.greedy else 2):
            for r in group:
                ids = torch.tensor([r.prompt_ids + r.completion_ids])
                with torch.no_grad():
                    logits = reference(ids).logits[0, len(r.prompt_ids) - 1 : -1] / (
                        sampling.temperature or 1.0
                    )
                expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r.completion_ids)[:, None])
                worst = max(worst, (expected.squeeze(-1) - torch.tensor(r.logprobs)).abs().max().item())
    return worst


def train_adapter(policy: torch.nn.Module, tokenizer, steps: int, seed: int) -> None:
    """A few real optimizer steps of the LM loss on addition text (only the adapter is trainable)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(["Q:347+285\nT:7+5=12,4+8+1=13,3+2+1=6\nA:632"] * 2, return_tensors="pt")
    for _ in range(steps):
        loss = policy(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def merged_copy(policy: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(policy).merge_and_unload().eval()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.own_process
def test_adapter_sync_equals_the_merged_model_and_moves_only_the_adapter(trained_tiny_dir, tmp_path, caplog):
    from reasoning.rollout.vllm_engine import VLLMEngine

    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_dir)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    # the policy's base is NOT the engine's checkpoint: another 1M model of the same shape
    other_base, _ = build_tiny_model("1m", seed=3)
    policy = apply_lora(other_base, {"r": 4, "lora_alpha": 16, "init_lora_weights": False})  # B ≠ 0
    train_adapter(policy, tokenizer, steps=3, seed=0)

    engine = VLLMEngine(str(trained_tiny_dir), max_model_len=256, lora_sync="adapter", max_lora_rank=4)
    reloads: list[bool] = []  # full-weight reloads (merge_adapters flag of each)
    reload = engine._reload

    def counting_reload(model, merge_adapters=True):
        reloads.append(merge_adapters)
        return reload(model, merge_adapters)

    engine._reload = counting_reload
    try:
        checkpoint = AutoModelForCausalLM.from_pretrained(trained_tiny_dir).eval()
        assert largest_logprob_error(engine, checkpoint, prompts) < 1e-4  # before any sync

        for step in range(3):  # three syncs, each after more training
            if step:
                train_adapter(policy, tokenizer, steps=2, seed=step)
            merged = merged_copy(policy)
            engine.sync_weights(policy)
            assert engine.last_sync == "adapter"
            assert largest_logprob_error(engine, merged, prompts) < 1e-4
            if step == 0:
                with torch.no_grad():  # the adapter matters: the base alone is far from the policy
                    base_only = copy.deepcopy(policy)
                    base_only.base_model.disable_adapter_layers()
                assert largest_logprob_error(engine, base_only, prompts) > 1e-2
        assert reloads == [False]  # the base once, at the first sync; then only the adapter moved
        assert all(not m.merged for m in policy.modules() if hasattr(m, "merged") and hasattr(m, "lora_A"))

        # what vLLM's LoRA layers cannot serve: merged weights instead, the reason logged once
        fresh = lambda: AutoModelForCausalLM.from_pretrained(trained_tiny_dir)  # noqa: E731
        unsupported = {
            "vLLM does not yet support DoRA": {"r": 4, "use_dora": True},
            "LoRA rank 16 is greater than max_lora_rank 8": {"r": 16},
            "Unsupported modules_to_save: ['lm_head']": {"r": 4, "modules_to_save": ["lm_head"]},
        }
        for reason, options in unsupported.items():
            other = apply_lora(fresh(), {**options, "init_lora_weights": False})
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="reasoning.rollout.vllm_engine"):
                engine.sync_weights(other)
            assert engine.last_sync == "merge"
            assert reason in caplog.text and "syncing merged weights instead" in caplog.text
            assert largest_logprob_error(engine, merged_copy(other), prompts) < 1e-4
        assert reloads == [False, True, True, True]

        # back to a servable adapter: the base is pushed again (the merged weights replaced it)
        engine.sync_weights(policy)
        assert engine.last_sync == "adapter" and reloads[-1] is False
        assert largest_logprob_error(engine, merged_copy(policy), prompts) < 1e-4
        assert len(reloads) == 5

        # a PEFT model on another base (the engine's checkpoint): its base is pushed, then its adapter
        second = apply_lora(fresh(), {"r": 4, "lora_alpha": 16, "init_lora_weights": False})
        engine.sync_weights(second)
        assert engine.last_sync == "adapter" and reloads[5:] == [False]
        assert largest_logprob_error(engine, merged_copy(second), prompts) < 1e-4
        engine.sync_weights(second)  # same base: the adapter alone
        assert reloads[5:] == [False]

        # adapters switched off: the policy is its base, which the adapter path would not give
        with (
            second.disable_adapter(),
            caplog.at_level(logging.WARNING, logger="reasoning.rollout.vllm_engine"),
        ):
            engine.sync_weights(second)
            assert engine.last_sync == "merge" and "the adapters are disabled" in caplog.text
        assert largest_logprob_error(engine, checkpoint, prompts) < 1e-4
    finally:
        engine.close()
    assert engine.llm is None
    engine.close()  # closing twice is harmless


def grpo_recipe(output_dir: Path, base: Path, max_steps: int):
    return load_recipe(
        ROOT / "recipes" / "demo" / "grpo.yaml",
        [
            f"--model.path={base}",
            "--model.lora={r: 4, lora_alpha: 16, init_lora_weights: false}",
            # the KL to the adapter-disabled base and the process reward give gradients even when every
            # completion is wrong (as in test_lora.py)
            "--grpo.beta=0.1",
            "--reward.functions=[correctness, reference_steps]",
            "--rollout.engine=vllm",
            "--rollout.engine_kwargs={lora_sync: adapter}",
            "--rollout.max_tokens=24",
            "--data.train=synthetic:addition?digits=3&n=64&seed=1&split=train",
            "--grpo.num_generations=4",
            "--eval.benchmarks=[]",
            "--eval.before=false",
            f"--training.max_steps={max_steps}",
            "--training.per_device_train_batch_size=8",
            "--training.gradient_accumulation_steps=1",
            "--training.learning_rate=2e-2",
            '--training.save_strategy="steps"',
            "--training.save_steps=2",
            "--training.logging_steps=1",
            "--training.disable_tqdm=true",
            "--training.report_to=none",
            f"--training.output_dir={output_dir}",
        ],
    )


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.own_process
def test_grpo_recipe_with_adapter_sync_resumes_to_the_uninterrupted_weights(
    trained_tiny_dir, tmp_path, caplog
):
    from reasoning.rollout.vllm_engine import VLLMEngine

    syncs: list[str] = []
    sync = VLLMEngine.sync_weights

    def recording_sync(self, model):
        sync(self, model)
        syncs.append(self.last_sync)

    VLLMEngine.sync_weights = recording_sync
    try:
        with caplog.at_level(logging.WARNING, logger="reasoning.rollout.vllm_engine"):
            # each run as from a fresh process: the adapter's random initialisation draws from the
            # global generator before the trainer seeds it (a new process starts from torch's fixed seed)
            set_seed(0)
            run(grpo_recipe(tmp_path / "whole", trained_tiny_dir, max_steps=3))
            assert syncs == ["adapter"] * 3
            set_seed(0)
            run(grpo_recipe(tmp_path / "parts", trained_tiny_dir, max_steps=2))  # checkpoint-2, then stop
            shutil.rmtree(tmp_path / "parts" / "final")  # as if stopped before the end (else: finished)
            set_seed(0)
            run(grpo_recipe(tmp_path / "parts", trained_tiny_dir, max_steps=3))  # resumes from checkpoint-2
        assert syncs == ["adapter"] * 6  # a new engine after the resume: base + checkpoint's adapter
        assert "syncing merged weights instead" not in caplog.text
    finally:
        VLLMEngine.sync_weights = sync
    whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "parts" / "final" / "model.safetensors")
    base = load_file(trained_tiny_dir / "model.safetensors")
    assert max((whole[k] - base[k]).abs().max().item() for k in base) > 1e-4  # the adapter moved the policy
    trained = load_file(tmp_path / "whole" / "checkpoint-3" / "adapter_model.safetensors")
    start = load_file(tmp_path / "whole" / "checkpoint-2" / "adapter_model.safetensors")
    assert max((trained[k] - start[k]).abs().max().item() for k in trained) > 1e-5  # and was trained
    first_two = load_file(tmp_path / "parts" / "checkpoint-2" / "adapter_model.safetensors")
    assert max((start[k] - first_two[k]).abs().max().item() for k in start) < 1e-6  # the same first steps
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < 1e-6
    logs = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in logs if "sampling/logp_difference_mean" in e]
    assert len(steps) == 3 and max(e["sampling/logp_difference_mean"] for e in steps) < 1e-4
