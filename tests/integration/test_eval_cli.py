"""`reasoning eval` on real benchmark files, and clear errors for bad input."""

import json
import shutil

from transformers import AutoTokenizer

from reasoning.data.templates import template_for
from reasoning.eval.benchmarks import load_benchmark
from reasoning.eval.evaluate import length_needs


def test_eval_writes_results_and_samples_for_real_benchmarks(trained_tiny_dir, tmp_path, run_cli):
    out = tmp_path / "eval"
    result = run_cli(
        "eval",
        "--model",
        str(trained_tiny_dir),
        "--benchmarks",
        "gsm8k,math500",
        "--n",
        "2",
        "--temperature",
        "0.6",
        "--limit",
        "3",
        "--max-tokens",
        "16",
        "--device",
        "cpu",
        "--output-dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["benchmarks"]) == {"gsm8k", "math500"} and results["device"] == "cpu"
    for metrics in results["benchmarks"].values():
        assert {"avg@2", "pass@1", "pass@2", "maj@2", "problems"} <= set(metrics) and metrics["problems"] == 3
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 3 * 2
    for name, metrics in results["benchmarks"].items():  # the share of completions cut by the budget
        reasons = [line["finish_reason"] for line in lines if line["benchmark"] == name]
        assert metrics["truncated_share"] == reasons.count("length") / len(reasons)
    assert "gsm8k" in result.stderr or "gsm8k" in result.stdout  # the results table is printed


def test_eval_unknown_benchmark_is_a_clear_error(trained_tiny_dir, run_cli):
    result = run_cli("eval", "--model", str(trained_tiny_dir), "--benchmarks", "gsm9k")
    assert result.returncode == 2
    assert "unknown benchmark" in result.stderr and "gsm8k" in result.stderr


def test_train_unknown_key_is_a_clear_error(tmp_path, run_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "trainer: sft\nmodel: {tiny: 1m}\ndata: {train: 'synthetic:addition?n=10'}\ntraining: {max_step: 1}\n"
    )
    result = run_cli("train", str(recipe))
    assert result.returncode == 2
    assert "unknown key 'max_step' in section 'training'; did you mean 'max_steps'?" in " ".join(
        result.stderr.split()
    )


def test_accelerate_launch_runs_a_recipe_single_process(tmp_path, run_cli):
    """`accelerate launch -m reasoning train RECIPE.yaml` (single CPU process) trains and saves."""
    launcher = [
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "reasoning",
    ]
    result = run_cli(
        "train",
        "recipes/demo/sft.yaml",
        f"--training.output_dir={tmp_path / 'run'}",
        "--training.max_steps=3",
        "--data.train=synthetic:addition?n=300&split=train",
        "--eval.benchmarks=[]",
        env={"ACCELERATE_USE_CPU": "1"},
        module=launcher,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_with_the_vllm_engine(trained_tiny_dir, tmp_path, run_cli):
    out = tmp_path / "eval"
    result = run_cli(
        "eval",
        "--model",
        str(trained_tiny_dir),
        "--benchmarks",
        "addition",
        "--limit",
        "20",
        "--engine",
        "vllm",
        "--output-dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["engine"] == "vllm" and results["benchmarks"]["addition"]["problems"] == 20
    # the engine was sized to the longest prompt + addition's own budget (64), not vLLM's default
    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_dir)
    problems = {"addition": load_benchmark("addition", limit=20)}
    (need,) = length_needs(tokenizer, template_for(tokenizer), problems, {"addition": 64})
    assert results["max_model_len"] == need.prompt + 64
    assert results["benchmarks"]["addition"]["max_tokens"] == 64
    reasons = [json.loads(line)["finish_reason"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert results["benchmarks"]["addition"]["truncated_share"] == reasons.count("length") / len(reasons)


def short_context_copy(source, folder, context: int):
    """`source` with a `context`-token context (config and tokenizer); RoPE weights do not depend on it."""
    shutil.copytree(source, folder)
    limits = (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length"))
    for name, key in limits:
        values = json.loads((folder / name).read_text())
        values[key] = context
        (folder / name).write_text(json.dumps(values))
    return folder


def test_eval_lengths_that_do_not_fit_are_errors_before_any_generation(trained_tiny_dir, tmp_path, run_cli):
    model = short_context_copy(trained_tiny_dir, tmp_path / "model", 40)
    tokenizer = AutoTokenizer.from_pretrained(model)
    problems = {"addition": load_benchmark("addition")}
    prompt = length_needs(tokenizer, template_for(tokenizer), problems, {"addition": 1})[0].prompt
    out = tmp_path / "eval"
    base = ["eval", "--model", str(model), "--benchmarks", "addition", "--output-dir", str(out)]
    # addition's own budget (64 tokens) cannot fit a 40-token context, whatever the engine
    for engine in ("vllm", "hf"):
        result = run_cli(*base, "--engine", engine)
        assert result.returncode == 2, result.stderr[-2000:]
        assert (
            f"error: benchmark addition: its longest prompt has {prompt} tokens and the budget is 64 new "
            f"tokens, {prompt + 64} in all, more than the model's context of 40 tokens (the model's "
            "max_position_embeddings); lower the budget (--max-tokens, eval.max_tokens) to at most "
            f"{40 - prompt}"
        ) in " ".join(result.stderr.split())
    # an explicit --max-model-len too small for prompt + budget
    result = run_cli(*base, "--engine", "vllm", "--max-tokens", "20", "--max-model-len", "24")
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert f"{prompt + 20} in all, more than max_model_len 24 (--max-model-len" in message
    assert f"Raise it to at least {prompt + 20}, or leave it unset" in message
    assert not out.exists()  # nothing was generated nor written
    # options that do not apply to the engine
    result = run_cli(*base, "--engine", "hf", "--max-tokens", "20", "--max-model-len", "64")
    assert result.returncode == 2 and "--max-model-len sizes the context of --engine vllm" in result.stderr
    result = run_cli(*base, "--max-tokens", "20", "--device", "cuda")
    assert result.returncode == 2 and "no CUDA device is visible" in " ".join(result.stderr.split())
    assert not out.exists()
