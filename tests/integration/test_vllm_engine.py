"""Real vLLM (CPU build) against transformers: greedy outputs, log-probs, weight sync, LoRA, stops."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["Q:347+285\nT:", "Q:12+9\nT:", "Q:999+1\nT:", "Q:500+500\nT:", "Q:71+36\nT:", "Q:8+8\nT:"]


@pytest.fixture(scope="module")
def hf_model(trained_tiny_dir):
    return AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(trained_tiny_dir):
    return AutoTokenizer.from_pretrained(trained_tiny_dir)


def encode(tokenizer, prompts=PROMPTS):
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def recompute_logprobs(model, prompt, completion, temperature=1.0):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_tiny_model_greedy_matches_transformers(vllm_engine, hf_model, tokenizer):
    vllm_engine.sync_weights(hf_model)
    sampling = Sampling(temperature=0, max_tokens=40)
    ours = vllm_engine.generate(encode(tokenizer), sampling)
    reference = HFEngine(model=hf_model, tokenizer=tokenizer).generate(encode(tokenizer), sampling)
    texts = [g[0].text for g in ours]
    assert len(set(texts)) > 2, texts  # the model is not degenerate
    for mine, theirs in zip(ours, reference):
        assert mine[0].completion_ids == theirs[0].completion_ids
        assert mine[0].finish_reason == theirs[0].finish_reason
        assert mine[0].text == theirs[0].text


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_transformers_recomputation(vllm_engine, hf_model, tokenizer, temperature):
    vllm_engine.sync_weights(hf_model)
    groups = vllm_engine.generate(
        encode(tokenizer), Sampling(temperature=temperature, max_tokens=30, seed=3), n=4
    )
    worst = 0.0
    for group in groups:
        assert len(group) == 4
        for rollout in group:
            assert len(rollout.logprobs) == len(rollout.completion_ids) > 0
            expected = recompute_logprobs(hf_model, rollout.prompt_ids, rollout.completion_ids, temperature)
            worst = max(worst, (expected - torch.tensor(rollout.logprobs)).abs().max().item())
    assert worst < 1e-4, worst


def test_sync_after_optimizer_step_changes_generation(vllm_engine, hf_model, tokenizer):
    model = copy.deepcopy(hf_model).train()
    vllm_engine.sync_weights(model)
    greedy = Sampling(temperature=0, max_tokens=30)
    before = [g[0].completion_ids for g in vllm_engine.generate(encode(tokenizer), greedy)]
    # a few optimizer steps towards a different format change the weights substantially
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.tensor([tokenizer("Q:1+1\nT:zzzz\nA:zz", add_special_tokens=False)["input_ids"]] * 4)
    for _ in range(5):
        loss = model(target, labels=target).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    vllm_engine.sync_weights(model)
    after = vllm_engine.generate(encode(tokenizer), greedy)
    reference = HFEngine(model=model, tokenizer=tokenizer).generate(encode(tokenizer), greedy)
    assert [g[0].completion_ids for g in after] == [g[0].completion_ids for g in reference]
    assert [g[0].completion_ids for g in after] != before
    sampled = vllm_engine.generate(encode(tokenizer)[:2], Sampling(temperature=1.0, max_tokens=20, seed=1))
    for group in sampled:
        expected = recompute_logprobs(model, group[0].prompt_ids, group[0].completion_ids)
        assert (expected - torch.tensor(group[0].logprobs)).abs().max() < 1e-4
    # tied embeddings stay tied in the engine: the logprob check above would fail otherwise
    assert model.config.tie_word_embeddings
    vllm_engine.sync_weights(hf_model)


def test_stops_and_lengths_match_hf(vllm_engine, hf_model, tokenizer):
    vllm_engine.sync_weights(hf_model)
    hf = HFEngine(model=hf_model, tokenizer=tokenizer)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    for sampling in [
        Sampling(temperature=0, max_tokens=5),
        Sampling(temperature=0, max_tokens=40, stop=("\nA:",)),
        Sampling(temperature=0, max_tokens=40, stop_token_ids=(newline,)),
    ]:
        ours = vllm_engine.generate(encode(tokenizer), sampling)
        theirs = hf.generate(encode(tokenizer), sampling)
        for a, b in zip(ours, theirs):
            assert a[0].finish_reason == b[0].finish_reason, sampling
            assert a[0].text == b[0].text, sampling
            assert a[0].completion_ids == b[0].completion_ids, sampling
        if sampling.max_tokens == 5:
            assert all(g[0].finish_reason == "length" and len(g[0].completion_ids) == 5 for g in ours)
        if sampling.stop:
            assert all("\nA:" not in g[0].text for g in ours)


def test_same_seed_same_samples(vllm_engine, hf_model, tokenizer):
    vllm_engine.sync_weights(hf_model)
    sampling = Sampling(temperature=1.0, max_tokens=20, seed=11)
    first = vllm_engine.generate(encode(tokenizer), sampling, n=3)
    second = vllm_engine.generate(encode(tokenizer), sampling, n=3)
    assert [[r.completion_ids for r in g] for g in first] == [[r.completion_ids for r in g] for g in second]
    other = vllm_engine.generate(encode(tokenizer), Sampling(temperature=1.0, max_tokens=20, seed=12), n=3)
    assert [[r.completion_ids for r in g] for g in first] != [[r.completion_ids for r in g] for g in other]


def test_lora_sync_equals_merged_model(vllm_engine, hf_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(
        copy.deepcopy(hf_model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    ids = torch.tensor([encode(tokenizer)[0]])
    with torch.no_grad():
        before = policy(ids).logits.clone()
    vllm_engine.sync_weights(policy)
    merged = copy.deepcopy(policy).merge_and_unload().eval()
    groups = vllm_engine.generate(encode(tokenizer), Sampling(temperature=1.0, max_tokens=20, seed=2), n=2)
    for group in groups:
        for rollout in group:
            expected = recompute_logprobs(merged, rollout.prompt_ids, rollout.completion_ids)
            assert (expected - torch.tensor(rollout.logprobs)).abs().max() < 1e-4
    with torch.no_grad():
        assert torch.equal(policy(ids).logits, before)  # the training model is untouched
    assert any("lora_A" in n for n, _ in policy.named_parameters())
    vllm_engine.sync_weights(hf_model)
