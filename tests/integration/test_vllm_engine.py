"""Real vLLM (CPU build) against transformers: greedy outputs, log-probs, weight sync, LoRA, stops.

The engine and the briefly trained tiny model are session fixtures (`tests/conftest.py`); every
test that uses the engine first syncs the weights it expects, so test order does not matter.

Log-prob semantics checked here: the engine returns vLLM's *processed* log-probs, i.e.
log softmax(warp(logits))[token] where warp = temperature, then top-k, then top-p (the
distribution the token was drawn from), and the untempered log-softmax for greedy decoding --
the same numbers transformers' warpers give.
"""

import copy
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from reasoning.rollout import Sampling
from reasoning.rollout.hf import HFEngine
from reasoning.rollout.vllm_engine import iter_full_weights

PROMPTS = [
    "Q:347+285\nT:",
    "Q:12+9\nT:",
    "Q:999+1\nT:",
    "Q:500+500\nT:",
    "Q:71+36\nT:",
    "Q:8+8\nT:",
    "Q:604+77\nT:",
    "Q:250+139\nT:",
]


# longer than one KV-cache block (128 tokens on CPU): its first block is prefix-cached across calls
LONG_PROMPT = "".join(f"Q:{i}+{3 * i}\nA:{4 * i}\n" for i in range(12)) + "Q:347+285\nT:"


@pytest.fixture(scope="module")
def hf_model(trained_tiny_dir):
    return AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(trained_tiny_dir):
    return AutoTokenizer.from_pretrained(trained_tiny_dir)


def encode(tokenizer, prompts=PROMPTS):
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def recompute_logprobs(model, prompt, completion, sampling: Sampling | None = None):
    """log-probs of `completion` under `model` after the warpers of `sampling` (HF's own warpers)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    if sampling is not None and not sampling.greedy:
        warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
        if sampling.top_k:
            warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1:
            warpers.append(TopPLogitsWarper(sampling.top_p))
        logits = torch.cat(
            [warpers(ids[:, : len(prompt) + t], logits[t : t + 1]) for t in range(len(completion))]
        )
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def worst_logprob_error(model, groups, sampling) -> float:
    worst = 0.0
    for group in groups:
        for rollout in group:
            assert len(rollout.logprobs) == len(rollout.completion_ids) > 0
            expected = recompute_logprobs(model, rollout.prompt_ids, rollout.completion_ids, sampling)
            worst = max(worst, (expected - torch.tensor(rollout.logprobs)).abs().max().item())
    return worst


def engine_tensor(engine, getter):
    """Read a tensor from the engine's model (collective_rpc with a callable: in-process only)."""

    def read(worker):
        return getter(worker.model_runner.model).detach().clone()

    return engine.llm.collective_rpc(read)[0]


# ----------------------------------------------------------------------------- (a) greedy


@pytest.mark.vllm
@pytest.mark.slow
def test_greedy_matches_transformers(vllm_engine, hf_model, tokenizer):
    vllm_engine.sync_weights(hf_model)
    sampling = Sampling(temperature=0, max_tokens=40)
    ours = vllm_engine.generate(encode(tokenizer), sampling)
    reference = HFEngine(model=hf_model, tokenizer=tokenizer).generate(encode(tokenizer), sampling)
    # the model is not degenerate: different prompts, different and varied completions
    assert len({g[0].text for g in ours}) >= 6, [g[0].text for g in ours]
    assert all(len(set(g[0].completion_ids)) > 3 for g in ours)
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine[0].completion_ids == theirs[0].completion_ids
        assert mine[0].finish_reason == theirs[0].finish_reason
        assert mine[0].text == theirs[0].text
    assert {g[0].finish_reason for g in ours} == {"stop"}  # they end on EOS ...
    assert all(g[0].completion_ids[-1] == tokenizer.eos_token_id for g in ours)  # ... which is kept
    # greedy log-probs are the untempered ones
    assert worst_logprob_error(hf_model, ours, None) < 1e-4
    # vLLM refuses n > 1 with greedy sampling; the engine returns n copies of the one greedy completion
    three = vllm_engine.generate(encode(tokenizer)[:2], sampling, n=3)
    assert [len(g) for g in three] == [3, 3]
    for group, single in zip(three, ours):
        assert all(r.completion_ids == single[0].completion_ids and r.text == single[0].text for r in group)


# ----------------------------------------------------------------------------- (b) log-probs


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(temperature=1.0, max_tokens=30, seed=3),
        Sampling(temperature=0.7, max_tokens=30, seed=3),
        Sampling(temperature=1.3, top_k=8, top_p=0.9, max_tokens=30, seed=4),
    ],
    ids=["t1.0", "t0.7", "t1.3-topk8-topp0.9"],
)
def test_sampling_logprobs_are_processed_logprobs(vllm_engine, hf_model, tokenizer, sampling):
    vllm_engine.sync_weights(hf_model)
    groups = vllm_engine.generate(encode(tokenizer), sampling, n=4)
    assert worst_logprob_error(hf_model, groups, sampling) < 1e-4
    if sampling.temperature != 1.0:
        # and they are not the raw (untempered) log-probs
        assert worst_logprob_error(hf_model, groups, None) > 1e-2
    # the transformers engine returns the same quantity for its own samples
    hf_groups = HFEngine(model=hf_model, tokenizer=tokenizer).generate(encode(tokenizer)[:2], sampling, n=2)
    assert worst_logprob_error(hf_model, hf_groups, sampling) < 1e-4


# ----------------------------------------------------------------------------- (c, d) weight sync


class _Wrapped(torch.nn.Module):
    """Stands in for DDP / accelerate wrappers: the model is `.module`."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


@pytest.mark.vllm
@pytest.mark.slow
def test_sync_after_optimizer_steps(vllm_engine, hf_model, tokenizer):
    assert vllm_engine.dtype == torch.float32  # what sync casts the trainer's tensors to
    model = copy.deepcopy(hf_model).train()
    prompts = encode(tokenizer, [*PROMPTS, LONG_PROMPT])
    assert 128 < len(prompts[-1]) < 200
    vllm_engine.sync_weights(model)
    greedy = Sampling(temperature=0, max_tokens=30)
    before = [g[0].completion_ids for g in vllm_engine.generate(prompts, greedy)]
    # a few Adam steps towards a different format change every weight, the embedding included
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.tensor([tokenizer("Q:1+1\nT:zzzz\nA:zz", add_special_tokens=False)["input_ids"]] * 4)
    for _ in range(5):
        model(target, labels=target).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    vllm_engine.sync_weights(_Wrapped(model))
    # the long prompt's cached block was computed with the old weights: sync must drop it
    after = vllm_engine.generate(prompts, greedy)
    reference = HFEngine(model=model, tokenizer=tokenizer).generate(prompts, greedy)
    assert [g[0].completion_ids for g in after] == [g[0].completion_ids for g in reference]
    assert [g[0].completion_ids for g in after] != before
    sampling = Sampling(temperature=0.8, max_tokens=20, seed=1)
    sampled = vllm_engine.generate(prompts, sampling, n=2)
    assert worst_logprob_error(model, sampled, sampling) < 1e-4
    # (d) tied embeddings: the engine's output layer is the new embedding matrix
    assert model.config.tie_word_embeddings
    embedding = model.get_input_embeddings().weight.detach()
    vocab = embedding.shape[0]  # vLLM pads the vocabulary dimension (to a multiple of 64)
    assert torch.equal(engine_tensor(vllm_engine, lambda m: m.lm_head.weight)[:vocab], embedding)
    assert torch.equal(engine_tensor(vllm_engine, lambda m: m.model.embed_tokens.weight)[:vocab], embedding)


# ----------------------------------------------------------------------------- (e) stops


@pytest.mark.vllm
@pytest.mark.slow
def test_stops_and_lengths_match_hf(vllm_engine, hf_model, tokenizer):
    vllm_engine.sync_weights(hf_model)
    hf = HFEngine(model=hf_model, tokenizer=tokenizer)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    for sampling in [
        Sampling(temperature=0, max_tokens=5),
        Sampling(temperature=0, max_tokens=40, stop=("\nA:",)),
        Sampling(temperature=0, max_tokens=40, stop=("+", "\nA:")),
        Sampling(temperature=0, max_tokens=40, stop_token_ids=(newline,)),
        Sampling(temperature=0, max_tokens=40, ignore_eos=True),
    ]:
        ours = vllm_engine.generate(encode(tokenizer), sampling)
        theirs = hf.generate(encode(tokenizer), sampling)
        for a, b in zip(ours, theirs, strict=True):
            assert a[0].finish_reason == b[0].finish_reason, sampling
            assert a[0].text == b[0].text, sampling
            assert a[0].completion_ids == b[0].completion_ids, sampling
        reasons = {g[0].finish_reason for g in ours}
        if sampling.max_tokens == 5 or sampling.ignore_eos:
            assert reasons == {"length"}
            assert all(len(g[0].completion_ids) == sampling.max_tokens for g in ours)
        if sampling.ignore_eos:  # EOS is drawn and generation goes on past it (the text skips it)
            assert any(tokenizer.eos_token_id in g[0].completion_ids[:-1] for g in ours)
        if sampling.stop:
            assert "stop" in reasons
            assert all(s not in g[0].text for g in ours for s in sampling.stop)
        if sampling.stop_token_ids:
            assert all(g[0].completion_ids[-1] == newline for g in ours if g[0].finish_reason == "stop")
            assert all("\n" not in g[0].text for g in ours)


# ----------------------------------------------------------------------------- (f, g) seeds and n


@pytest.mark.vllm
@pytest.mark.slow
def test_seeds_and_n(vllm_engine, hf_model, tokenizer):
    vllm_engine.sync_weights(hf_model)
    sampling = Sampling(temperature=1.0, max_tokens=20, seed=11)
    first = vllm_engine.generate(encode(tokenizer), sampling, n=3)
    second = vllm_engine.generate(encode(tokenizer), sampling, n=3)

    def ids(groups):
        return [[r.completion_ids for r in g] for g in groups]

    assert ids(first) == ids(second)
    assert ids(first) != ids(
        vllm_engine.generate(encode(tokenizer), Sampling(temperature=1.0, max_tokens=20, seed=12), n=3)
    )
    assert len(first) == len(PROMPTS)
    for index, group in enumerate(first):
        assert len(group) == 3
        assert all(r.prompt_index == index and r.prompt_ids == encode(tokenizer)[index] for r in group)
    # the n samples of one seeded request are different draws
    assert sum(len({tuple(r.completion_ids) for r in g}) for g in first) > 2 * len(PROMPTS)
    texts = vllm_engine.generate_text(PROMPTS[:2], sampling, n=3)
    assert ids(texts) == ids(first)[:2]


def test_seeded_batch_larger_than_the_token_budget(vllm_engine, hf_model, tokenizer):
    """More prompt tokens than one scheduler step takes: with chunked prefill, vLLM rewinds the
    seeded request's generator, which a CPU generator cannot do (the engine turns chunking off)."""
    vllm_engine.sync_weights(hf_model)
    prompts = [encode(tokenizer, [LONG_PROMPT])[0][-100:] for _ in range(60)]
    budget = vllm_engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    assert sum(len(p) for p in prompts) * 4 > budget  # the batch does not fit one step
    groups = vllm_engine.generate(prompts, Sampling(temperature=0.7, max_tokens=6, seed=3), n=4)
    assert [len(g) for g in groups] == [4] * len(prompts)
    again = vllm_engine.generate(prompts[:2], Sampling(temperature=0.7, max_tokens=6, seed=3), n=4)
    assert [[r.completion_ids for r in g] for g in again] == [
        [r.completion_ids for r in g] for g in groups[:2]
    ]


# ----------------------------------------------------------------------------- (h) LoRA


def _lora_policy(model):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return policy


@pytest.mark.vllm
@pytest.mark.slow
def test_lora_sync_equals_merged_model(vllm_engine, hf_model, tokenizer):
    policy = _lora_policy(hf_model)
    ids = torch.tensor([encode(tokenizer)[0]])
    with torch.no_grad():
        before = policy(ids).logits.clone()
    vllm_engine.sync_weights(policy)
    merged = copy.deepcopy(policy).merge_and_unload().eval()
    sampling = Sampling(temperature=1.0, max_tokens=20, seed=2)
    groups = vllm_engine.generate(encode(tokenizer), sampling, n=2)
    assert worst_logprob_error(merged, groups, sampling) < 1e-4
    assert worst_logprob_error(hf_model, groups, sampling) > 1e-2  # the adapters matter
    # the training model is untouched: adapters present, unmerged, same outputs
    with torch.no_grad():
        assert torch.equal(policy(ids).logits, before)
    layers = [m for m in policy.modules() if hasattr(m, "merged") and hasattr(m, "lora_A")]
    assert layers and not any(m.merged for m in layers)


def test_weight_names_match_the_checkpoint(hf_model):
    """Plain, wrapped and PEFT models stream the checkpoint's names (lm_head included), merged."""
    expected = hf_model.state_dict()
    for model in (hf_model, _Wrapped(hf_model)):
        got = dict(iter_full_weights(model))
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    # a bf16 engine fed by an fp32 trainer: every tensor arrives already cast, names unchanged
    cast = dict(iter_full_weights(hf_model, dtype=torch.bfloat16))
    assert sorted(cast) == sorted(expected)
    assert all(cast[k].dtype == torch.bfloat16 and torch.equal(cast[k], expected[k].bfloat16()) for k in expected)
    policy = _lora_policy(hf_model)
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    got = dict(iter_full_weights(policy))
    assert sorted(got) == sorted(merged)
    assert max((got[k] - merged[k]).abs().max().item() for k in merged) < 1e-6
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], expected["model.layers.0.self_attn.q_proj.weight"]
    )


ZERO3_SCRIPT = textwrap.dedent(
    """
    import copy, os, sys
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    import deepspeed, torch
    from peft import LoraConfig, get_peft_model
    from reasoning.models.tiny import build_tiny_model
    from reasoning.rollout.vllm_engine import iter_full_weights

    deepspeed.init_distributed(dist_backend="gloo")
    config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    reference, _ = build_tiny_model("1m", seed=0)
    policy = get_peft_model(copy.deepcopy(reference), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    cases = [(copy.deepcopy(reference), reference.state_dict()),
             (policy, copy.deepcopy(policy).merge_and_unload().state_dict())]
    for model, expected in cases:
        deepspeed.zero.Init(module=model, config_dict_or_path=config)
        embed = model.get_input_embeddings().weight
        assert hasattr(embed, "ds_id") and embed.numel() == 0, "not partitioned"
        got = dict(iter_full_weights(model))
        assert sorted(got) == sorted(expected), sorted(set(got) ^ set(expected))
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        assert worst < 1e-6, worst
        assert embed.numel() == 0, "left gathered"
    print("OK")
    """
)


@pytest.mark.slow
def test_zero3_partitioned_weights_are_gathered(tmp_path):
    """ZeRO-3 (single process, gloo): sharded plain and LoRA models stream full, merged tensors."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "zero3.py"
    script.write_text(ZERO3_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


# ----------------------------------------------------------------------------- memory


@pytest.mark.vllm
@pytest.mark.slow
def test_sleep_is_a_noop_on_cpu(vllm_engine, hf_model, tokenizer):
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    vllm_engine.sync_weights(hf_model)
    greedy = Sampling(temperature=0, max_tokens=10)
    before = vllm_engine.generate(encode(tokenizer)[:2], greedy)
    vllm_engine.sleep(level=2)
    vllm_engine.wake_up()
    assert [g[0].completion_ids for g in vllm_engine.generate(encode(tokenizer)[:2], greedy)] == [
        g[0].completion_ids for g in before
    ]
