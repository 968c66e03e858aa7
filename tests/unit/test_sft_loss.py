"""SFT losses on a real tiny model: Dr. SFT's global constant and per-sample weights."""

import pytest
import torch
from datasets import Dataset

from reasoning.data.datasets import load_records
from reasoning.models.tiny import build_tiny_model
from reasoning.testing import cpu_training_args
from reasoning.trainers.sft import SFTConfig, make_sft_trainer, mean_completion_length, tokenize_sft


def records(n=8):
    rows = load_records("synthetic:addition?digits=3&n=64&seed=3&split=train").select(range(n))
    # uneven completion lengths, so a per-batch token count and the global constant differ
    return rows.map(lambda r, i: {"solution": r["solution"] + "," * (i % 5)}, with_indices=True)


def one_step(tmp_path, data, batch, accumulation, dr_sft=True, weights=None):
    model, tokenizer = build_tiny_model("1m", seed=0)
    if weights is not None:
        data = data.add_column("weight", weights)
    args = cpu_training_args(
        tmp_path / f"b{batch}-ga{accumulation}",
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        dataloader_drop_last=True,
    )
    trainer = make_sft_trainer(model, tokenizer, data, args, SFTConfig(max_length=128, dr_sft=dr_sft))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.train()
    delta = {k: (v.detach() - before[k]) for k, v in model.named_parameters()}
    return trainer, delta, model, tokenizer


def test_dr_sft_constant_is_the_mean_completion_length(tmp_path):
    data = records()
    trainer, _, _, tokenizer = one_step(tmp_path, data, 8, 1)
    tokenized = tokenize_sft(data, tokenizer, SFTConfig(max_length=128))
    lengths = [sum(t != -100 for t in labels) for labels in tokenized["labels"]]
    assert len(set(lengths)) > 2
    assert trainer.loss_constant == pytest.approx(sum(lengths) / len(lengths))
    assert mean_completion_length(tokenized) == pytest.approx(sum(lengths) / len(lengths))


def test_dr_sft_loss_is_token_sum_over_constant_times_samples(tmp_path):
    data = records()
    trainer, _, model, tokenizer = one_step(tmp_path, data, 8, 1)
    # a micro-batch of 3 of the step's 8 samples: its loss is its share of the step's objective
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = (nll * mask).sum() / (trainer.loss_constant * 8)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # not the micro-batch's token mean (the two differ for these uneven lengths)
    assert abs(loss.item() - ((nll * mask).sum() / mask.sum()).item()) > 1e-3


@pytest.mark.parametrize("dr_sft", [True, False])
def test_gradient_accumulation_gives_the_same_update(tmp_path, dr_sft):
    data = records()
    _, whole, _, _ = one_step(tmp_path, data, 8, 1, dr_sft=dr_sft)
    _, accumulated, _, _ = one_step(tmp_path, data, 4, 2, dr_sft=dr_sft)
    _, quarters, _, _ = one_step(tmp_path, data, 2, 4, dr_sft=dr_sft)
    for name in whole:
        assert whole[name].abs().sum() > 0 or "norm" in name
        torch.testing.assert_close(accumulated[name], whole[name], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(quarters[name], whole[name], atol=1e-6, rtol=1e-4)


def test_sample_weights_scale_each_sample(tmp_path):
    data = records()
    # weight 2 on every sample = twice the update with SGD; weight 0 on all but one = that sample alone
    _, plain, _, _ = one_step(tmp_path, data, 8, 1)
    _, doubled, _, _ = one_step(tmp_path, data, 8, 1, weights=[2.0] * 8)
    for name in plain:
        assert_relatively_close(doubled[name], 2 * plain[name])
    single = Dataset.from_list([data[0]] * 8)
    _, only_first, _, _ = one_step(tmp_path, data, 8, 1, weights=[8.0] + [0.0] * 7)
    _, repeated, _, _ = one_step(tmp_path, single, 8, 1)
    # Dr. SFT divides by the constant of its own data, so compare after rescaling by the constants
    data_constant = mean_completion_length(tokenize_sft(data, build_tiny_model("1m")[1], SFTConfig()))
    single_constant = mean_completion_length(tokenize_sft(single, build_tiny_model("1m")[1], SFTConfig()))
    for name in plain:
        assert_relatively_close(only_first[name] * data_constant, repeated[name] * single_constant)
    # and the single-sample update is not the full-batch one (the weights did select)
    name = "model.embed_tokens.weight"
    assert (only_first[name] - plain[name]).norm() > 0.1 * plain[name].norm()


def assert_relatively_close(actual, expected, tolerance=2e-3):
    """Equal up to float32 rounding of (weights after − before): ‖a − e‖ ≤ tol · ‖e‖."""
    assert (actual - expected).norm() <= tolerance * expected.norm() + 1e-9


def test_posterior_fraction_mixes_prior_and_hinted_prompts():
    from reasoning.data.templates import template_for

    data = load_records("synthetic:addition?digits=3&n=200&seed=5&split=train")
    _, tokenizer = build_tiny_model("1m", seed=0)
    template = template_for(tokenizer)
    tokenized = tokenize_sft(data, tokenizer, SFTConfig(max_length=128, posterior_fraction=0.5))
    hinted = 0
    for row, ids, labels in zip(data, tokenized["input_ids"], tokenized["labels"]):
        prompt = tokenizer.decode([t for t, label in zip(ids, labels) if label == -100])
        prior = template.prior_prompt(row["question"], tokenizer)
        posterior = template.posterior_prompt(row["question"], row["answer"], tokenizer)
        assert prompt in (prior, posterior)
        hinted += prompt == posterior
    assert 70 <= hinted <= 130  # about half, fixed per question
    again = tokenize_sft(data, tokenizer, SFTConfig(max_length=128, posterior_fraction=0.5))
    assert again["input_ids"] == tokenized["input_ids"]
    with pytest.raises(ValueError, match="posterior_fraction"):
        SFTConfig(posterior_fraction=1.5)


def test_both_templates_gives_each_record_a_prior_and_a_hinted_sample():
    _, tokenizer = build_tiny_model("1m", seed=0)
    data = records(6).add_column("weight", [0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    plain = tokenize_sft(data, tokenizer, SFTConfig(max_length=128))
    both = tokenize_sft(data, tokenizer, SFTConfig(max_length=128, both_templates=True))
    assert len(both) == 2 * len(plain) == 12
    texts = [tokenizer.decode(ids) for ids in both["input_ids"]]
    for i, row in enumerate(data):
        prior, hinted = texts[2 * i], texts[2 * i + 1]
        assert prior == tokenizer.decode(plain[i]["input_ids"])  # the plain sample, unchanged
        assert f"H:{row['answer']}" in hinted and "H:" not in prior
        assert hinted.endswith(prior.split("\nT:", 1)[1])  # the same trace and answer after either prompt
        assert both[2 * i]["weight"] == both[2 * i + 1]["weight"] == row["weight"]
