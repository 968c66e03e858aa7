"""The performance suite's GRPO-step benchmark runs at toy size and its table reads the result.

Not a timing test: the benchmark itself (`python benchmarks/suite.py`) is run by hand; this only
checks that the script still runs against the current trainer and engine and reports every phase.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_suite():
    spec = importlib.util.spec_from_file_location("benchmark_suite", ROOT / "benchmarks" / "suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpo_step_benchmark_runs_once_at_toy_size_and_fills_the_table():
    command = [
        sys.executable, str(ROOT / "benchmarks" / "grpo_step.py"), "ours",
        "--prompts", "1", "--generations", "2", "--tokens", "8", "--micro-batch", "2",
        "--steps", "1", "--warmup", "0",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    (step,) = result["steps"]
    assert result["tokens_per_step"] == 2 * 8 and result["peak_rss_mb"] > 0
    assert step["generation"] > 0 and step["sync"] > 0 and step["forward_backward"] > 0
    parts = sum(v for k, v in step.items() if k != "total")
    assert abs(parts - step["total"]) < 1e-6  # "other" closes the sum

    suite = load_suite()
    report = suite.Report()
    totals = suite.step_table(report, "toy", {"ours": [result]}, None)
    assert totals["ours"][0] == step["total"] and totals["ours"][1] > 0  # wall, CPU seconds
    assert any(line.startswith("| ours | ") for line in report.lines)


def load_grpo_step():
    spec = importlib.util.spec_from_file_location("benchmark_grpo_step", ROOT / "benchmarks" / "grpo_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_w4_lengths_are_seeded_capped_log_normal_draws_with_a_tenth_at_the_cap():
    step = load_grpo_step()
    work = step.Workload(prompts=16, generations=8, tokens=512, lengths="lognormal", median_length=64)
    draws = [step.prescribed_lengths(work, k) for k in range(4)]
    assert draws[0] == step.prescribed_lengths(work, 0)  # every process draws the same lengths for a step
    assert draws[0] != draws[1]  # and new lengths every step
    for lengths in draws:
        assert len(lengths) == 128 and min(lengths) >= 1 and max(lengths) == 512
        assert 12 <= sum(n == 512 for n in lengths) <= 14  # stratified: 10 % of 128 at the cap
        assert 56 <= sorted(lengths)[64] <= 72  # median ~64
    # the token count hardly moves between steps, so both sides' steps cost alike
    totals = [sum(lengths) for lengths in draws]
    assert max(totals) - min(totals) < 0.02 * min(totals)
    assert step.step_tokens(step.Workload(prompts=2, generations=4, tokens=16)) == 2 * 4 * 16
    with pytest.raises(ValueError, match="fixed or lognormal"):
        step.prescribed_lengths(step.Workload(lengths="uniform"), 0)


def test_force_lengths_makes_transformers_generate_exactly_the_prescribed_lengths():
    import torch
    from transformers import LogitsProcessorList

    from reasoning.models.tiny import build_tiny_model

    step = load_grpo_step()
    model, _ = build_tiny_model("1m")
    lengths = [1, 4, 7, 2]
    prompts = torch.randint(2, 200, (4, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = model.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=7,
        eos_token_id=1, pad_token_id=0, logits_processor=LogitsProcessorList([step.ForceLengths(lengths, [1])]),
    )  # fmt: skip
    completions = out[:, 5:]
    for row, n in zip(completions.tolist(), lengths):
        assert row.index(1) == n - 1  # the first EOS ends the completion at exactly n tokens


def test_w4_quick_suite_runs_every_variant_at_the_prescribed_lengths(tmp_path):
    command = [
        sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--quick", "--only", "w4", "--no-compile-ours",
        "--json", str(tmp_path / "w4.json"),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "w4.json").read_text())
    results = saved["results"]["w4"]
    step = load_grpo_step()
    work = step.Workload(**results["ours"][0]["workload"])
    expected = step.step_tokens(work)  # prescribed lengths of the timed step
    for variant in ("ours", "trl"):
        (result,) = results[variant]
        assert result["length_mismatches"] == 0 and result["tokens_per_step"] == expected
        assert result["steps"][0]["generation"] > 0 and result["steps"][0]["forward_backward"] > 0
    (floor,) = results["floor"]
    assert floor["tokens_per_step"] == expected
    assert all(floor["runs"][k][0] > 0 for k in ("raw_generate", "train_bucketed", "train_packed"))
    assert floor["runs"]["train"] == floor["runs"][f"train_{floor['train_mode']}"]
    report = "\n".join(saved["report"])
    assert "### W4:" in report and "| W4 step: TRL / ours (≥1.8×) |" in report
    assert "Completions off their prescribed length: ours 0, TRL 0." in report


def test_every_reasoning_name_the_benchmark_scripts_import_exists():
    """The scripts import inside their functions (run by hand): a name moved out of a module (e.g.
    `elbo_perplexity`, now in `reasoning.models.latent_inference`) would break them only when run."""
    import ast
    import importlib

    missing = []
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("reasoning"):
                module = importlib.import_module(node.module)
                missing += [
                    f"{script.name}:{node.lineno}: {node.module}.{alias.name}"
                    for alias in node.names
                    if not hasattr(module, alias.name)
                    and not (  # a submodule of a package
                        hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")
                    )
                ]
    assert not missing, "names the benchmark scripts import that do not exist:\n" + "\n".join(missing)
