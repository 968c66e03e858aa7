"""On one batch, our GRPO loss and gradients equal TRL 1.16 GRPOTrainer's (loss_type grpo and dapo)."""

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from reasoning.models.tiny import build_tiny_model
from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer

trl = pytest.importorskip("trl")


def make_batch(tokenizer, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch_size, prompt_len, completion_len = 8, 6, 10
    prompt_ids = torch.randint(3, 120, (batch_size, prompt_len), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0  # left padding
    prompt_ids[0, :2] = tokenizer.pad_token_id
    completion_ids = torch.randint(3, 120, (batch_size, completion_len), generator=generator)
    completion_mask = torch.ones_like(completion_ids)
    for row, length in enumerate([10, 7, 3, 10, 5, 9, 1, 8]):
        completion_mask[row, length:] = 0
        completion_ids[row, length:] = tokenizer.pad_token_id
    advantages = torch.randn(batch_size, generator=generator)
    return prompt_ids, prompt_mask, completion_ids, completion_mask, advantages


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_loss_and_gradients_match_trl(tmp_path, loss_type):
    model, tokenizer = build_tiny_model("1m", seed=0)
    model.train()
    prompt_ids, prompt_mask, completion_ids, completion_mask, advantages = make_batch(tokenizer)
    # old log-probs that differ from the current ones so that some ratios are clipped
    with torch.no_grad():
        full = model(
            torch.cat([prompt_ids, completion_ids], 1),
            attention_mask=torch.cat([prompt_mask, completion_mask], 1),
        )
        logits = full.logits[:, prompt_ids.shape[1] - 1 : -1]
        current = torch.log_softmax(logits, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    old = current + 0.3 * torch.randn(current.shape, generator=torch.Generator().manual_seed(1))

    trl_args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        loss_type=loss_type,
        beta=0.0,
        epsilon=0.2,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=10,
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast; compare in fp32
        temperature=1.0,
    )
    prompts = Dataset.from_list([{"prompt": "Q:1+1\nT:"}] * 8)
    theirs = trl.GRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=trl_args,
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    theirs.current_gradient_accumulation_steps = 1  # set by the training loop in real runs
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": completion_mask.sum(),
    }
    model.zero_grad()
    their_loss = theirs._compute_loss(model, inputs)
    their_loss.backward()
    their_grads = grads(model)

    ours = GRPOTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path / "ours"), per_device_train_batch_size=8, report_to="none", use_cpu=True
        ),
        config=GRPOConfig(loss_type=loss_type, num_generations=4, epsilon=0.2, log_completions=False),
        train_dataset=Dataset.from_list([{"question": "1+1", "answer": "2"}] * 8),
        processing_class=tokenizer,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        engine=HFEngine(model=model, tokenizer=tokenizer),
        sampling=Sampling(temperature=1.0, max_tokens=10),
    )
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_logprobs": old,
        "generation_tokens": completion_mask.sum(),
    }
    model.zero_grad()
    our_loss = ours.compute_loss(model, batch)  # `loss`, scaled for accumulation, metrics recorded
    our_loss.backward()
    our_grads = grads(model)

    assert torch.allclose(our_loss, their_loss, atol=1e-6, rtol=0), (our_loss.item(), their_loss.item())
    assert our_grads.keys() == their_grads.keys() and our_grads
    for name in our_grads:
        assert torch.allclose(our_grads[name], their_grads[name], atol=1e-6, rtol=1e-5), name
    clipped = ours._metrics["clip_ratio/region"]
    assert clipped and clipped[0] > 0  # the batch exercises clipping
