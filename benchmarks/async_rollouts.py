"""One-step-off rollouts: GRPO step time with `max_staleness` 0 (synchronous) and 1 (docs/performance.md).

    python benchmarks/async_rollouts.py [--steps 12 --warmup 3 --repeats 2 --tiny 1m --threads 1]

Runs the demo recipe (recipes/demo/grpo.yaml: 8 prompts × 8 completions of at most 48 tokens, 3-digit
addition, dapo, one optimizer step per generation, colocated vLLM) with the real command line,
`reasoning train`, on a randomly initialised tiny model (`--tiny`), once per staleness per repeat,
alternating (0, 1, 0, 1, ...) so that both share the machine's noise. Each run logs every step;
the step time is the difference of consecutive `time` entries of metrics.jsonl (wall clock, the
first `--warmup` steps left out). Also reported per run (medians): the engine's generation time
(`time/generation`: with staleness 1 it runs in the background), what training waited for it
(`time/generation_wait`) and the weight sync. `uptime`'s load averages are printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run(staleness: int, args: argparse.Namespace, folder: Path) -> dict:
    out = folder / f"staleness{staleness}"
    command = [
        sys.executable, "-m", "reasoning", "train", "recipes/demo/grpo.yaml",
        "--model.path", "null", "--model.tiny", args.tiny,
        "--grpo.max_staleness", str(staleness),
        "--training.max_steps", str(args.steps + args.warmup),
        "--training.logging_steps", "1",
        "--training.save_steps", "100000",
        "--training.disable_tqdm", "true",
        "--training.output_dir", str(out),
        "--eval.before", "false",
        "--eval.benchmarks", "[]",
    ]  # fmt: skip
    threads = str(args.threads)
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"staleness {staleness}: exit {done.returncode}\n{done.stderr[-4000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    times = [b["time"] - a["time"] for a, b in zip(steps, steps[1:])][args.warmup - 1 :]
    timed = steps[args.warmup :]

    def median(name: str) -> float | None:
        values = [s[name] for s in timed if name in s]
        return statistics.median(values) if values else None

    return {
        "max_staleness": staleness,
        "step_median": statistics.median(times),
        "step_times": [round(t, 3) for t in times],
        "generation_median": median("time/generation"),
        "generation_wait_median": median("time/generation_wait"),
        "sync_median": median("time/sync"),
        "staleness_logged": sorted({s.get("sampling/staleness") for s in timed if "sampling/staleness" in s}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (at least 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per staleness, alternating")
    parser.add_argument("--tiny", default="1m", help="tiny model size (reasoning/models/tiny.py)")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of each run")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step has no previous one to time from)")
    print("load before:", load(), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for staleness in (0, 1):
                result = run(staleness, args, Path(folder) / f"r{repeat}")
                result["repeat"] = repeat
                results.append(result)
                print("RESULT", json.dumps(result), flush=True)
    print("load after:", load())
    for staleness in (0, 1):
        mine = [r for r in results if r["max_staleness"] == staleness]
        steps = statistics.median([t for r in mine for t in r["step_times"]])
        generation = statistics.median([r["generation_median"] for r in mine])
        print(f"max_staleness {staleness}: step median {steps:.3f} s, generation median {generation:.3f} s")


if __name__ == "__main__":
    main()
