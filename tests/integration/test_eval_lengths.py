"""Evaluation and rollouts with the real vLLM CPU engine on a trained tiny model whose context is 40 tokens:
the engine is sized so that only the token budget cuts a completion, what the budget cut is reported,
and torch's thread count survives the engine. Checks without an engine: tests/unit/test_lengths.py."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reasoning.data.templates import template_for
from reasoning.eval.benchmarks import load_benchmark
from reasoning.eval.evaluate import evaluate, length_needs
from reasoning.recipes import (
    build_engine,
    check_prompt_lengths,
    check_recipe,
    load_training_records,
    parse_recipe,
)

CONTEXT = 40
BUDGET = 25  # greedy completions of the trained model take 25-26 tokens: some stop, some are cut


@pytest.fixture(scope="module")
def short_context_dir(trained_tiny_dir, tmp_path_factory):
    """The session's trained tiny model with a 40-token context (RoPE: no weight depends on it)."""
    path = tmp_path_factory.mktemp("short-context") / "model"
    shutil.copytree(trained_tiny_dir, path)
    limits = (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length"))
    for name, key in limits:
        values = json.loads((path / name).read_text())
        values[key] = CONTEXT
        (path / name).write_text(json.dumps(values))
    return path


@pytest.fixture
def two_threads(monkeypatch):
    """torch at 2 threads with OMP_NUM_THREADS unset (vLLM then reduces torch to 1 thread for serving
    on GPUs and, on CPU, replaces torch.set_num_threads); put back afterwards."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    yield 2
    torch._C.set_num_threads(before)


def threads_are(count: int) -> bool:
    return torch.get_num_threads() == count and torch.set_num_threads is torch._C.set_num_threads


def samples(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.own_process
def test_vllm_evaluation_is_sized_so_that_only_the_budget_cuts(short_context_dir, tmp_path, two_threads):
    tokenizer = AutoTokenizer.from_pretrained(short_context_dir)
    problems = {"addition": load_benchmark("addition", limit=16)}
    (need,) = length_needs(tokenizer, template_for(tokenizer), problems, {"addition": BUDGET})
    common = dict(limit=16, max_tokens=BUDGET, temperature=0.0)
    model = str(short_context_dir)
    results = evaluate(model, ["addition"], engine="vllm", output_dir=tmp_path / "vllm", **common)
    assert threads_are(two_threads)  # the engine was built and closed in this process
    assert results["max_model_len"] == need.prompt + BUDGET <= CONTEXT
    vllm_samples = samples(tmp_path / "vllm")
    reasons = [line["finish_reason"] for line in vllm_samples]
    assert {"stop", "length"} <= set(reasons)
    for line in vllm_samples:  # "length" only at the budget, "stop" within it
        assert line["tokens"] == BUDGET if line["finish_reason"] == "length" else line["tokens"] <= BUDGET
    metrics = results["benchmarks"]["addition"]
    assert metrics["truncated_share"] == reasons.count("length") / len(reasons) > 0
    # transformers has no context cut at all: the same greedy completions, cut at the same places
    reference = evaluate(model, ["addition"], engine="hf", output_dir=tmp_path / "hf", **common)
    assert reference["device"] == "cpu" and reference["benchmarks"]["addition"]["truncated_share"] == (
        metrics["truncated_share"]
    )
    assert [(x["completion"], x["finish_reason"], x["tokens"]) for x in vllm_samples] == [
        (x["completion"], x["finish_reason"], x["tokens"]) for x in samples(tmp_path / "hf")
    ]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.own_process
def test_rollout_engine_is_sized_by_the_recipe_check_and_keeps_torch_threads(
    short_context_dir, tmp_path, two_threads
):
    raw = {
        "trainer": "grpo",
        "model": {"path": str(short_context_dir)},
        "data": {"train": "synthetic:addition?n=8&split=train"},
        "rollout": {"engine": "vllm", "max_tokens": 20},
        "grpo": {"num_generations": 2},
        "training": {"per_device_train_batch_size": 2, "output_dir": str(tmp_path / "run")},
    }
    recipe = parse_recipe(raw)
    records = load_training_records(recipe, check_recipe(recipe))
    model = AutoModelForCausalLM.from_pretrained(short_context_dir)
    tokenizer = AutoTokenizer.from_pretrained(short_context_dir)
    need = check_prompt_lengths(recipe, records, model, tokenizer)
    engine = build_engine(recipe, model, tokenizer, str(short_context_dir), need)
    try:
        assert threads_are(two_threads)  # right after the engine was built
        assert engine.max_model_len == need < CONTEXT
        # the rollout engine lent to an evaluation with a larger budget: refused before generating
        with pytest.raises(ValueError, match=rf"more than the engine's max_model_len of {need} tokens"):
            evaluate(str(short_context_dir), ["addition"], limit=4, max_tokens=BUDGET, engine=engine)
        results = evaluate(str(short_context_dir), ["addition"], limit=4, max_tokens=20, engine=engine)
        assert results["max_model_len"] == need and results["engine"] == "VLLMEngine"
    finally:
        engine.close()
    assert threads_are(two_threads)
