"""The colocated engine's sleep/wake order and its weight probe, on the real vLLM CPU engine (issue 20, B5).

vLLM's CPU build has no sleep mode, so `SleepRecorder` stands in for `vllm.LLM` where CUDA would be
needed: it records the engine's calls and emulates what sleep does to the weights (level 2 leaves
their memory with other contents; the bug users met in peers, a wake that brings the base weights
back, is one of its modes). Everything else -- the in-place reload, the prefix cache, the probe's
reads of the served weights -- runs on the real engine.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning.rollout import Sampling
from reasoning.rollout.vllm_engine import iter_full_weights

pytestmark = [pytest.mark.vllm]

PROMPTS = ["Q:347+285\nT:", "Q:12+9\nT:", "Q:999+1\nT:"]


class SleepRecorder:
    """`vllm.LLM` with recorded calls and sleep emulated on the real engine's weights."""

    def __init__(self, llm, shape_model: torch.nn.Module) -> None:
        self.llm, self.shape_model = llm, shape_model
        self.calls: list[tuple] = []
        self.asleep: set[str] = set()
        self.wake_restores: torch.nn.Module | None = None  # the peers' bug: these weights come back
        self.reload_applies = True

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def _load(self, weights) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    def sleep(self, level: int = 1, **_) -> None:
        self.calls.append(("sleep", level))
        self.asleep = {"weights", "kv_cache"}
        if level >= 2:  # the weights' memory was given back: whatever it holds now is not the weights
            self._load((n, torch.full_like(t, 0.5)) for n, t in iter_full_weights(self.shape_model))

    def wake_up(self, tags=None) -> bool:
        self.calls.append(("wake_up", tuple(tags) if tags else None))
        woken = set(tags or self.asleep)
        if "weights" in woken and self.wake_restores is not None:
            self._load(iter_full_weights(self.wake_restores))
        self.asleep -= woken
        return not self.asleep

    def collective_rpc(self, method, *args, kwargs=None, **rest):
        self.calls.append(("collective_rpc", method if isinstance(method, str) else method.__name__))
        if method == "reload_weights" and not self.reload_applies:
            for _ in kwargs["weights_iterator"]:  # consumed, never loaded
                pass
            return [None]
        return self.llm.collective_rpc(method, *args, kwargs=kwargs, **rest)

    def reset_prefix_cache(self, *args, **kwargs):
        self.calls.append(("reset_prefix_cache",))
        return self.llm.reset_prefix_cache(*args, **kwargs)


@pytest.fixture
def base(trained_tiny_dir):
    return AutoModelForCausalLM.from_pretrained(trained_tiny_dir, dtype=torch.float32).eval()


@pytest.fixture
def tuned(base):
    """The policy after training: every weight moved."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


@pytest.fixture
def sleepy(vllm_engine, base):
    """The session engine with sleep mode 'on' through the recorder; restored afterwards."""
    real = vllm_engine.llm
    recorder = SleepRecorder(real, base)
    vllm_engine.llm, vllm_engine.enable_sleep_mode = recorder, True
    try:
        yield vllm_engine, recorder
    finally:
        vllm_engine.llm, vllm_engine.enable_sleep_mode = real, False
        vllm_engine._sleeping, vllm_engine._weights_discarded = set(), False
        vllm_engine.sync_weights(base)


def logprob_error(model, groups) -> float:
    worst = 0.0
    for (rollout,) in groups:
        ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(rollout.prompt_ids) - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(rollout.completion_ids)[:, None])[:, 0]
        worst = max(worst, (expected - torch.tensor(rollout.logprobs)).abs().max().item())
    return worst


def test_probe_covers_what_the_cpu_engine_stores_as_the_trainer_does(vllm_engine, base):
    vllm_engine.sync_weights(base)
    probed = set(vllm_engine._probe)
    # CPU linear layers are repacked (a 0-element `weight`) and q/k/v fused: the embedding (vocab rows
    # padded in vLLM) and the norms are stored under the trainer's names and layouts
    assert "model.embed_tokens.weight" in probed and "model.norm.weight" in probed
    assert {f"model.layers.{i}.input_layernorm.weight" for i in range(2)} <= probed
    assert not any("q_proj" in name or "qkv_proj" in name for name in probed)


def test_sleep_level_2_then_sync_wakes_weights_reloads_then_wakes_kv(sleepy, tuned, trained_tiny_dir):
    engine, recorder = sleepy
    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_dir)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    greedy = Sampling(temperature=0, max_tokens=10)
    engine.sleep(level=2)
    assert recorder.calls == [("sleep", 2)]
    with pytest.raises(RuntimeError, match=r"discarded by sleep\(level=2\): call sync_weights"):
        engine.generate(prompts, greedy)
    recorder.calls.clear()
    engine.sync_weights(tuned)
    assert recorder.calls == [
        ("wake_up", ("weights",)),
        ("collective_rpc", "reload_weights"),
        ("wake_up", ("kv_cache",)),
        ("reset_prefix_cache",),
        ("collective_rpc", "_read_probe"),
    ]
    assert not engine._asleep
    recorder.calls.clear()
    groups = engine.generate(prompts, greedy)
    assert recorder.calls == []  # awake: generation neither wakes nor probes
    assert logprob_error(tuned, groups) < 1e-4  # the synced weights, not what the sleep left


def test_level_1_wake_is_probed_and_a_stale_restore_is_caught(sleepy, base, tuned, trained_tiny_dir):
    engine, recorder = sleepy
    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_dir)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    greedy = Sampling(temperature=0, max_tokens=10)
    engine.sync_weights(tuned)
    engine.sleep(level=1)  # weights kept (offloaded): a wake must bring back exactly these
    recorder.calls.clear()
    assert logprob_error(tuned, engine.generate(prompts, greedy)) < 1e-4
    assert recorder.calls == [("wake_up", None), ("collective_rpc", "_read_probe")]
    recorder.wake_restores = base  # the complaint in peers: sleep mode served the base weights
    engine.sleep(level=1)
    with pytest.raises(RuntimeError, match=r"after wake_up, the vLLM engine's weights differ from the trainer's"):
        engine.generate(prompts, greedy)


def test_a_reload_that_does_not_apply_is_caught(sleepy, tuned):
    engine, recorder = sleepy
    recorder.reload_applies = False
    with pytest.raises(RuntimeError, match=r"after sync_weights, .* differ .* probed tensors") as error:
        engine.sync_weights(tuned)
    probed = len(engine._probe)  # every tensor stored as the trainer has it: all of them differ
    assert f"in {probed} of {probed} probed tensors (model.embed_tokens.weight" in str(error.value)
    recorder.reload_applies = True
    engine.sync_weights(tuned)  # a reload that applies passes the same probe


def test_probe_can_be_turned_off(sleepy, tuned):
    engine, recorder = sleepy
    recorder.reload_applies = False
    engine.check_weights = False
    try:
        engine.sync_weights(tuned)  # nothing checks: the engine silently keeps the old weights
        assert ("collective_rpc", "_read_probe") not in recorder.calls
    finally:
        engine.check_weights = True
