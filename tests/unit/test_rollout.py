"""Engine construction and sampling settings fail clearly on bad input; the hf engine's device, the
model's context length and torch's thread count after vLLM."""

import json

import pytest
import torch
from accelerate.state import PartialState

from reasoning.models.tiny import build_tiny_model
from reasoning.rollout import Sampling, context_length, make_engine
from reasoning.rollout.hf import HFEngine, choose_device


def test_make_engine_rejects_unknown_and_unavailable_kinds():
    with pytest.raises(ValueError, match="choose one of hf, vllm, vllm-server"):
        make_engine("sglang", "x")
    with pytest.raises(ValueError, match="weight_sync 'rsync' is not one of checkpoint, nccl"):
        make_engine("vllm-server", "x", weight_sync="rsync")


def test_sampling_validates_its_fields():
    assert Sampling(temperature=0).greedy
    for bad, message in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
    ]:
        with pytest.raises(ValueError, match=message):
            Sampling(**bad)



def fake_gpus(monkeypatch, count: int) -> None:
    """This machine has no GPU: make torch report `count` CUDA devices (mocking only the GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_choose_device_takes_the_gpu_when_there_is_one(monkeypatch):
    # a fresh process: accelerate has chosen nothing yet (monkeypatch puts the shared state back)
    monkeypatch.setattr(PartialState, "_shared_state", {})
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    fake_gpus(monkeypatch, 0)
    assert choose_device() == torch.device("cpu")
    fake_gpus(monkeypatch, 2)
    assert choose_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")  # a launched rank takes its own GPU
    assert choose_device() == torch.device("cuda", 1)
    assert choose_device("cuda:1") == torch.device("cuda", 1) and choose_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"'cuda:2' does not exist: 2 CUDA device\(s\) are visible"):
        choose_device("cuda:2")
    fake_gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match="'cuda' was asked for but no CUDA device is visible"):
        choose_device("cuda")
    with pytest.raises(ValueError, match="'gpu0' is not a torch device; use cpu, cuda or cuda:N"):
        choose_device("gpu0")


def test_choose_device_follows_the_device_accelerate_chose(monkeypatch):
    """In a training process (TrainingArguments / a launcher initialised accelerate) its device wins:
    here the CPU of `use_cpu`, although a GPU is (said to be) available."""
    state = PartialState(cpu=True)
    fake_gpus(monkeypatch, 1)
    assert state.device == torch.device("cpu") and choose_device() == torch.device("cpu")
    assert choose_device("cuda") == torch.device("cuda")  # asked for explicitly


def test_hf_engine_loads_its_model_on_the_chosen_device(tmp_path):
    build_tiny_model("1m", tmp_path, max_positions=64)
    engine = HFEngine(str(tmp_path), device="cpu")
    assert engine.device == torch.device("cpu") and engine.model.device == torch.device("cpu")
    groups = engine.generate([[5, 6, 7]], Sampling(temperature=0, max_tokens=3))
    assert len(groups[0][0].completion_ids) <= 3
    with pytest.raises(ValueError, match="generates where the live model is"):
        HFEngine(model=engine.model, tokenizer=engine.tokenizer, device="cpu")


def test_context_length_reads_the_config_and_a_smaller_tokenizer_limit(tmp_path):
    model, tokenizer = build_tiny_model("1m", max_positions=96)
    assert context_length(model.config, tokenizer) == (96, "the model's max_position_embeddings")
    tokenizer.model_max_length = 80
    assert context_length(model.config, tokenizer) == (80, "the tokenizer's model_max_length")
    tokenizer.model_max_length = int(1e30)  # transformers' "no limit stated"
    assert context_length(model.config, tokenizer) == (96, "the model's max_position_embeddings")

    class Multimodal:  # the text model's limit sits in text_config (e.g. Qwen2-VL, Gemma 3)
        text_config = model.config

    assert context_length(Multimodal()) == (96, "the model's max_position_embeddings")
    assert context_length(object()) == (None, "")
    # the same numbers come back from a saved checkpoint
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == 96


def test_restore_torch_threads_undoes_what_vllm_does_to_torch(monkeypatch):
    """vLLM's CPU worker replaces torch.set_num_threads with a logging no-op and its GPU worker sets one
    thread; restore_torch_threads puts both back (the real engine: tests/integration/test_eval_lengths.py)."""
    from reasoning.rollout.vllm_engine import restore_torch_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(torch, "set_num_threads", lambda count: None)  # what CPUWorker.init_device does
        restore_torch_threads(2)
        assert torch.set_num_threads is torch._C.set_num_threads and torch.get_num_threads() == 2
    finally:
        torch._C.set_num_threads(before)
