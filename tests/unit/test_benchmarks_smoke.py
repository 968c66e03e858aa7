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
