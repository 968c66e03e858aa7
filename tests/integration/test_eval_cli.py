"""`reasoning eval` on real benchmark files, and clear errors for bad input."""

import json


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
        "--output-dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["benchmarks"]) == {"gsm8k", "math500"}
    for metrics in results["benchmarks"].values():
        assert {"avg@2", "pass@1", "pass@2", "maj@2", "problems"} <= set(metrics) and metrics["problems"] == 3
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 3 * 2
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
