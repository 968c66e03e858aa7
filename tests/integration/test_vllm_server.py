"""The vllm-server engine against a real `vllm serve` (CPU build) on loopback.

One server process for the module (start-up takes ~15 s on 2 cores); its process group is killed
at teardown. Checked: generations and log-probs equal transformers' (greedy, and sampled with
warpers), prompts sharded over several URLs, one GRPO step with server rollouts, then a weight push
after which the server generates from the new weights; an unreachable server fails fast and clearly.
Start-up reads each server's `/server_info` and refuses one without processed log-probs or (for NCCL)
a weight-transfer engine; a push that fails on one of several servers stops the engine; `close()`
shuts every weight-transfer engine down. A local stub server (`StubServer`) stands in where the CPU
build cannot: GPU-only configuration fields, and a second server that goes down.
"""

import copy
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    # (the refusal of a server without a weight-transfer engine, and of a sync without GPUs, are
    # checked in test_server_info_is_read_and_unsuitable_servers_are_refused)


# ----------------------------------------------------------------------------- server_info, failures, close


class StubServer:
    """A local HTTP server answering the start-up checks with a real server's recorded answers
    (`/server_info` possibly edited: the GPU-only fields) and every POST with 200; `down()` stops it."""

    def __init__(self, answers: dict[str, dict]) -> None:
        posts = self.posts = []

        class Handler(BaseHTTPRequestHandler):
            def _send(self, body: dict | None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path not in answers:
                    self.send_error(404)
                    return
                self._send(answers[path])

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                posts.append(self.path)
                self._send({})

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def down(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture(scope="module")
def recorded(server) -> dict[str, dict]:
    """The real server's answers to the start-up checks."""
    answers = {path: httpx.get(server + path, timeout=120).json() for path in ("/v1/models", "/openapi.json")}
    answers["/health"] = None
    answers["/server_info"] = httpx.get(server + "/server_info?config_format=json", timeout=120).json()
    return answers


def stub_with(recorded, **config_changes) -> StubServer:
    info = copy.deepcopy(recorded["/server_info"])
    for key, value in config_changes.items():
        section, _, field = key.partition("__")
        if field:
            info["vllm_config"][section][field] = value
        else:
            info["vllm_config"][section] = value
    return StubServer({**recorded, "/server_info": info})


def test_server_info_is_read_and_unsuitable_servers_are_refused(server, model_dir, recorded):
    config = recorded["/server_info"]["vllm_config"]
    # the real CPU server: processed log-probs, no weight-transfer engine
    assert config["model_config"]["logprobs_mode"] == "processed_logprobs"
    assert config["weight_transfer_config"] is None
    with VLLMServerEngine(str(model_dir), servers=server):
        pass  # checkpoint pushes need no weight-transfer engine
    with pytest.raises(RuntimeError, match=r"has no NCCL weight-transfer engine .*--weight-transfer-config") as error:
        VLLMServerEngine(str(model_dir), servers=server, weight_sync="nccl", nccl_host="127.0.0.1")
    assert server in str(error.value)
    with pytest.raises(ValueError, match="needs nccl_host"):
        VLLMServerEngine(str(model_dir), servers=server, weight_sync="nccl")
    # GPU-only and misconfigured servers, through a stub that answers with the real server's edited configuration
    raw = stub_with(recorded, model_config__logprobs_mode="raw_logprobs")
    nccl = stub_with(recorded, weight_transfer_config={"backend": "nccl"})
    try:
        with pytest.raises(RuntimeError, match=r"runs with logprobs_mode 'raw_logprobs'.*--logprobs-mode processed_logprobs"):
            VLLMServerEngine(str(model_dir), servers=[server, raw.url])
        with VLLMServerEngine(str(model_dir), servers=nccl.url, weight_sync="nccl", nccl_host="127.0.0.1") as engine:
            assert engine.servers == [nccl.url]
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            with pytest.raises(RuntimeError, match="needs GPUs; on CPU use weight_sync='checkpoint'"):
                engine.sync_weights(model)
            assert engine._failure is None  # refused before any push: nothing is inconsistent
    finally:
        raw.down()
        nccl.down()


def test_a_push_that_fails_on_one_server_stops_the_engine(server, model_dir, recorded, tokenizer, tmp_path):
    """Two servers, one goes down: the push raises naming it, and the engine then refuses to push to (or
    sample from) the one still up, whose weights may now differ from the other's."""
    stub = stub_with(recorded)
    weights = tmp_path / "weights"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = VLLMServerEngine(str(model_dir), servers=[server, stub.url], weights_dir=str(weights), retries=0)
    try:
        engine.sync_weights(model)  # both up
        assert stub.posts == ["/collective_rpc", "/reset_prefix_cache"]
        stub.down()
        with pytest.raises(ServerUnreachableError, match=r"failed on 1 of 2 server\(s\) \(" + stub.url) as error:
            engine.sync_weights(model)
        assert f"answered: {server}" in str(error.value)
        versions = sorted(p.name for p in weights.iterdir())
        for call in (lambda: engine.sync_weights(model), lambda: engine.generate(encode(tokenizer), Sampling())):
            with pytest.raises(RuntimeError, match=r"an earlier weight push failed .*refuses to push or sample again"):
                call()
        assert sorted(p.name for p in weights.iterdir()) == versions  # nothing written, nothing pushed
    finally:
        engine.close()


class TransferRecorder:
    """A trainer-side NCCL weight-transfer engine (GPU only) reduced to its calls."""

    def __init__(self, calls: list, name: str, fail_send: bool = False, fail_shutdown: bool = False) -> None:
        self.calls, self.name, self.fail_send, self.fail_shutdown = calls, name, fail_send, fail_shutdown
        self.is_sender = True
        recorder = self

        class Client:
            def shutdown_weight_transfer_engine(self):
                recorder.calls.append((recorder.name, "server shutdown"))
                if recorder.fail_shutdown:
                    raise ConnectionError("server gone")

        self.client = Client()

    def send_weights(self):
        self.calls.append((self.name, "send"))
        if self.fail_send:
            raise RuntimeError("NCCL broadcast failed")

    def shutdown(self):
        self.calls.append((self.name, "trainer shutdown"))


def test_nccl_push_stops_at_the_first_failing_server_and_close_shuts_every_engine_down(
    server, model_dir, monkeypatch, caplog
):
    calls: list = []
    engine = VLLMServerEngine(str(model_dir), servers=[server, server])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine.weight_sync = "nccl"  # as if both servers had NCCL weight-transfer engines (GPU only)
    engine._nccl_source = model_weight_source(model)
    engine._nccl_engines = [TransferRecorder(calls, "a", fail_send=True, fail_shutdown=True), TransferRecorder(calls, "b")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        with pytest.raises(RuntimeError, match="NCCL broadcast failed"):
            engine.sync_weights(model)
        assert calls == [("a", "send")]  # server b was not pushed to
        with pytest.raises(RuntimeError, match="an earlier weight push failed"):
            engine.sync_weights(model)
        assert calls == [("a", "send")]
    finally:
        monkeypatch.undo()
        with caplog.at_level(logging.WARNING, logger="reasoning.rollout.vllm_server"):
            engine.close()
    assert calls[1:] == [
        ("a", "server shutdown"),  # fails (a warning) ...
        ("a", "trainer shutdown"),  # ... and the rest still runs
        ("b", "server shutdown"),
        ("b", "trainer shutdown"),
    ]
    assert any("shutting the server's weight-transfer engine down failed" in r.getMessage() for r in caplog.records)
