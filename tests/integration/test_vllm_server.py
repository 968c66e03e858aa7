"""The vllm-server engine against a real `vllm serve` (CPU build) on loopback.

One server process for the module (start-up takes ~15 s on 2 cores); its process group is killed
at teardown. Checked: generations and log-probs equal transformers' (greedy, and sampled with
warpers), prompts sharded over several URLs, one GRPO step with server rollouts, then a weight push
after which the server generates from the new weights; an unreachable server fails fast and clearly.
"""

import copy
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from reasoning.data.datasets import load_records
from reasoning.models.tiny import build_tiny_model
from reasoning.rewards.verifier import correctness
from reasoning.rollout import Sampling, make_engine
from reasoning.rollout.vllm_server import (
    ServerUnreachableError,
    VLLMServerEngine,
    model_weight_source,
    server_command,
)
from reasoning.trainers.grpo import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.vllm

PROMPTS = ["Q:347+285\nT:", "Q:12+9\nT:", "Q:999+1\nT:", "Q:500+500\nT:", "Q:71+36\nT:"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("server-model")
    build_tiny_model("1m", path, seed=3)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """A real `vllm serve` process with the dev-mode endpoints; yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = server_command(str(model_dir), "127.0.0.1", port, max_model_len=256)
    command += ["--kv-cache-memory-bytes", str(256 * 2**20), "--seed", "0"]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not become healthy in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def encode(tokenizer, prompts=PROMPTS):
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def reference_logprobs(model, prompt, completion, temperature=1.0, top_k=0):
    """log-probs of `completion` under `model` after temperature and top-k (the processed log-probs)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def greedy_reference(model, prompt, steps):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False)
    return out[0, len(prompt) :].tolist()


def worst_error(model, groups, **warpers) -> float:
    return max(
        (reference_logprobs(model, r.prompt_ids, r.completion_ids, **warpers) - torch.tensor(r.logprobs))
        .abs()
        .max()
        .item()
        for group in groups
        for r in group
    )


def test_generation_matches_transformers_across_sharded_servers(server, model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # the same server under two URLs: requests are dealt round-robin over the list
    with make_engine("vllm-server", str(model_dir), servers=[server, server + "/"], batch_size=2) as engine:
        assert engine.servers == [server, server] and engine.max_model_len == 256
        prompts = encode(tokenizer)
        greedy = engine.generate(prompts, Sampling(temperature=0, max_tokens=12), n=2)
        assert [len(g) for g in greedy] == [2] * len(PROMPTS)
        for prompt, group in zip(prompts, greedy):
            expected = greedy_reference(model, prompt, 12)
            for rollout in group:
                assert rollout.prompt_ids == prompt
                assert rollout.completion_ids == expected[: len(rollout.completion_ids)]
                assert rollout.finish_reason in ("stop", "length")
        assert worst_error(model, greedy) < 1e-4

        sampling = Sampling(temperature=0.7, top_k=20, max_tokens=10)
        seeds = [11, 12, 13, 14, 15]
        sampled = engine.generate(prompts, sampling, n=3, seeds=seeds)
        assert worst_error(model, sampled, temperature=0.7, top_k=20) < 1e-4
        again = engine.generate(prompts, sampling, n=3, seeds=seeds)
        assert [[r.completion_ids for r in g] for g in again] == [
            [r.completion_ids for r in g] for g in sampled
        ]
        texts = [r.text for g in sampled for r in g]
        ids = [
            r.completion_ids[:-1] if r.finish_reason == "stop" else r.completion_ids
            for g in sampled
            for r in g
        ]
        assert texts == tokenizer.batch_decode(ids, skip_special_tokens=True)


def test_grpo_step_then_weight_push_reaches_the_server(server, model_dir, tokenizer, tmp_path):
    """One GRPO step with server rollouts changes the policy; after the push the server generates
    from the new weights (greedy ids and log-probs equal transformers'), and not the old ones."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = VLLMServerEngine(str(model_dir), servers=server, weights_dir=str(tmp_path / "weights"))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=8,
        learning_rate=5e-2,  # a big step, so that old and new weights are easy to tell apart
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model,
        args=args,
        config=GRPOConfig(num_generations=4, loss_type="grpo", beta=0.0),
        train_dataset=load_records("synthetic:addition?digits=3&n=16&seed=3&split=train"),
        processing_class=tokenizer,
        reward_funcs=[correctness, lambda completions, **_: [-len(c) / 10 for c in completions]],
        engine=engine,
        sampling=Sampling(temperature=1.0, max_tokens=16, seed=0),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        trainer.train()
        assert trainer.sync_count == 1 and trainer.state.global_step == 1
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
        model.eval()
        prompts = encode(tokenizer)
        greedy = Sampling(temperature=0, max_tokens=12)
        stale = engine.generate(prompts, greedy)  # the server still holds the pre-step weights
        assert worst_error(model, stale) > 1e-2

        engine.sync_weights(model)
        fresh = engine.generate(prompts, greedy)
        for prompt, (rollout,) in zip(prompts, fresh):
            assert (
                rollout.completion_ids == greedy_reference(model, prompt, 12)[: len(rollout.completion_ids)]
            )
        assert worst_error(model, fresh) < 1e-4
        assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [
            "v2"
        ]  # the trainer's push was v1, then removed
    finally:
        engine.close()
    assert (tmp_path / "weights").exists()  # a weights_dir given by the user is kept


def test_unreachable_server_fails_with_the_url_and_the_fix_after_backed_off_retries(model_dir, caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level("WARNING", logger="reasoning.rollout.vllm_server"):
        with pytest.raises(ServerUnreachableError) as error:
            VLLMServerEngine(str(model_dir), servers=[url], retries=2, backoff=0.05, connect_timeout=1)
    message = str(error.value)
    assert url in message and "after 3 attempts" in message and "ConnectError" in message
    assert "VLLM_SERVER_DEV_MODE=1" in message and "vllm.entrypoints.openai.api_server" in message
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert [m.rsplit("retrying in ", 1)[1] for m in retries] == ["0.05 s", "0.10 s"]  # doubled


def test_lora_policy_push_equals_the_merged_model(server, model_dir, tokenizer, tmp_path):
    """A PEFT LoRA policy is pushed merged (W + ΔW): the server's log-probs equal the merged model's."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    )
    merged = copy.deepcopy(policy).merge_and_unload().eval()
    with VLLMServerEngine(str(model_dir), servers=server, weights_dir=str(tmp_path / "w")) as engine:
        engine.sync_weights(policy)
        groups = engine.generate(encode(tokenizer), Sampling(temperature=0, max_tokens=12))
        assert worst_error(merged, groups) < 1e-4
        assert (
            worst_error(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), groups) > 1e-2
        )


def test_nccl_weight_source_streams_what_it_declares(server, model_dir):
    """The GPU push hands vLLM's NCCL trainer engine a WeightSource whose metadata sizes the servers'
    receive buffers: checked here with vLLM's own metadata-vs-iteration check (on CPU tensors)."""
    from peft import LoraConfig, get_peft_model
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    source = model_weight_source(policy)
    meta = source.metadata()
    names = [m.name for m in meta]
    assert "lm_head.weight" in names and not any("lora_" in n or "base_layer" in n for n in names)
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    for _ in range(2):  # vLLM iterates the source once per sync: it must be re-iterable
        streamed = list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))
        assert [n for n, _ in streamed] == names
        assert all(torch.allclose(t, merged[n], atol=1e-6) for n, t in streamed)
    with VLLMServerEngine(str(model_dir), servers=server, weight_sync="nccl") as engine:
        with pytest.raises(RuntimeError, match="needs GPUs; on CPU use weight_sync='checkpoint'"):
            engine.sync_weights(policy)
