"""The performance suite: ours vs TRL and vs the floor, one command, one table.

    python benchmarks/suite.py            # the full suite (about 15 min on a quiet 2-core machine)
    python benchmarks/suite.py --quick    # toy sizes, one repetition: checks that everything runs
    python benchmarks/suite.py --only w1 --rounds 5 --json w1.json

Sections (see docs/performance.md for the workloads and the targets):
- `trl-vllm`: TRL GRPOTrainer with its colocated vLLM; records the error it raises here.
- `w1`: one GRPO step, 8 prompts × 8 completions × 128 tokens: ours (GRPOTrainer + VLLMEngine),
  TRL (GRPOTrainer, transformers generate) and the floor (raw `LLM.generate` + one plain
  forward/backward/AdamW of the batch; also our engine's and transformers' generate alone).
- `w2`: 4× the completions, 2× the length (ours and TRL).
- `scaling`: our step at 32, 64, 128 and 256 completions of 128 tokens.
- `w3`: 64 prompts × 8 samples × 256 tokens, then log-probs under two models (ours vs transformers).
- `w4`: one GRPO step on variable lengths: 16 prompts × 8 completions whose lengths are prescribed per
  step (log-normal, median 64, 10 % at the 512 cap): ours, TRL and the token-exact floor (raw
  `LLM.generate` of those lengths + one fwd/bwd/AdamW over exactly the non-pad tokens).
- `logprobs`: chunked log-probs vs naive full-vocabulary log_softmax at vocab 151,936.
- `lora-sync`: LoRA weight sync into the colocated engine, adapter-only vs merge-and-sync (25M, r=16).

Every measurement runs in its own process; ours and the peer alternate (ABAB) so that they share
the machine's load. Reported: medians over all timed repetitions, with [min–max].
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = ("trl-vllm", "w1", "w2", "scaling", "w3", "w4", "logprobs", "lora-sync")


def child(script: str, args: list[str], timeout: float = 3600) -> dict:
    """Run one benchmark process and return the JSON it prints after `RESULT `."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(HERE / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
    raise RuntimeError(f"{' '.join(command)} exited with {done.returncode} and no result:\n{tail}")


def workload_args(**fields) -> list[str]:
    out = []
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            out += [flag, str(value)]
    return out


def median_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def pooled_steps(results: list[dict], key: str = "steps") -> dict[str, list[float]]:
    """Every timed step of every process of one variant, column by column (`cpu_steps`: CPU time)."""
    columns: dict[str, list[float]] = {}
    for result in results:
        for step in result[key]:
            for name, value in step.items():
                columns.setdefault(name, []).append(value)
    return columns


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.targets: list[tuple[str, str, bool | None]] = []

    def add(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)

    def target(self, name: str, value: str, ok: bool | None) -> None:
        self.targets.append((name, value, ok))


PHASES = ("total", "generation", "sync", "logprobs", "forward_backward", "optimizer", "other")


def step_table(
    report: Report, title: str, rows: dict[str, list[dict]], floor: list[dict] | None
) -> dict[str, tuple[float, float]]:
    """Markdown table of per-step phases (wall clock); returns {variant: (median wall, median CPU)}."""
    report.add(f"\n### {title}\n")
    report.add(
        "| variant | step s [min–max] | CPU s | generation | weight sync | log-prob recompute "
        "| forward+backward | optimizer | other | tokens/s | peak RSS MB | runs |"
    )
    report.add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    totals = {}
    for variant, results in rows.items():
        if not results:
            continue
        columns = pooled_steps(results)
        total, low, high = median_range(columns["total"])
        cpu = statistics.median(pooled_steps(results, "cpu_steps")["total"])
        totals[variant] = (total, cpu)
        tokens = results[0]["tokens_per_step"]
        cells = [f"{statistics.median(columns[p]):.3f}" for p in PHASES[1:]]
        peak = max(r["peak_rss_mb"] for r in results)
        report.add(
            f"| {variant} | {total:.2f} [{low:.2f}–{high:.2f}] | {cpu:.2f} | {' | '.join(cells)} "
            f"| {tokens / total:.0f} "
            f"| {peak:.0f} | {len(columns['total'])} |"
        )
    if floor:
        runs = {k: [v for r in floor for v in r["runs"][k]] for k in floor[0]["runs"]}
        cpu_runs = {k: [v for r in floor for v in r["cpu_runs"][k]] for k in floor[0]["cpu_runs"]}
        totals_floor = [g + t for g, t in zip(runs["raw_generate"], runs["train"])]
        total, low, high = median_range(totals_floor)
        cpu = statistics.median(g + t for g, t in zip(cpu_runs["raw_generate"], cpu_runs["train"]))
        totals["floor"] = (total, cpu)
        tokens = floor[0]["tokens_per_step"]
        report.add(
            f"| floor: raw LLM.generate + plain fwd/bwd/AdamW | {total:.2f} [{low:.2f}–{high:.2f}] | {cpu:.2f} "
            f"| {statistics.median(runs['raw_generate']):.3f} | – | – | {statistics.median(runs['train']):.3f} "
            f"(incl. AdamW) | – | – | {tokens / total:.0f} | {max(r['peak_rss_mb'] for r in floor):.0f} "
            f"| {len(totals_floor)} |"
        )
    gpu_memory_note(report, {**rows, **({"floor": floor} if floor else {})})
    return totals


def gpu_memory_note(report: Report, rows: dict[str, list[dict]]) -> None:
    """On a GPU: each variant's device and peak GPU memory (the results' `device_memory`, from
    `torch.cuda.max_memory_allocated` / `max_memory_reserved`, vLLM's KV cache included)."""
    cells = []
    for variant, results in rows.items():
        memory = [r["device_memory"] for r in results or [] if "device_memory" in r]
        if memory:
            cells.append(
                f"{variant} {max(m['peak_allocated_mb'] for m in memory):.0f} / "
                f"{max(m['peak_reserved_mb'] for m in memory):.0f} / {max(m['in_use_mb'] for m in memory):.0f}"
            )
    if cells:
        name = next(r.get("gpu_name", "") for results in rows.values() for r in results or [] if "device_memory" in r)
        report.add(f"\nGPU ({name}) memory, MB (peak allocated / peak reserved / in use at the end): {'; '.join(cells)}")


def generation_table(report: Report, floor: list[dict]) -> dict[str, tuple[float, float]]:
    runs = {k: [v for r in floor for v in r["runs"][k]] for k in floor[0]["runs"]}
    cpu_runs = {k: [v for r in floor for v in r["cpu_runs"][k]] for k in floor[0]["cpu_runs"]}
    tokens = floor[0]["tokens_per_step"]
    report.add("\n### W1 generation alone (same process, alternating)\n")
    report.add("| backend | seconds [min–max] | CPU s | tokens/s | runs |")
    report.add("|---|---|---|---|---|")
    medians = {}
    for key, name in [
        ("engine_generate", "reasoning VLLMEngine.generate"),
        ("raw_generate", "raw vllm LLM.generate (same SamplingParams)"),
        ("hf_generate", "transformers generate (HFEngine, before vLLM starts)"),
    ]:
        m, low, high = median_range(runs[key])
        cpu = statistics.median(cpu_runs[key])
        medians[key] = (m, cpu)
        report.add(
            f"| {name} | {m:.3f} [{low:.3f}–{high:.3f}] | {cpu:.3f} | {tokens / m:.0f} | {len(runs[key])} |"
        )
    return medians


def run_w1(
    args, report: Report, prefix: str, work: dict, variants: list[str], rounds: int, compile_ours: bool | None = None
) -> dict:
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for round_index in range(rounds):
        # ABAB: ours and the peer swap places every round; the floor sits between rounds
        order = [v for v in ("ours", "trl") if v in variants]
        if round_index % 2:
            order.reverse()
        order += [v for v in variants if v not in ("ours", "trl")]
        for variant in order:
            start = time.perf_counter()
            ours = args.compile_ours if compile_ours is None else compile_ours
            compiled = ours if variant == "ours" else args.compile_trl if variant == "trl" else False
            results[variant].append(child("grpo_step.py", [variant, *workload_args(**work, compile=compiled)]))
            print(f"  [{prefix} round {round_index + 1}/{rounds}] {variant}: "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return results


def section_w1(args, report: Report, data: dict) -> None:
    work = args.w1
    results = run_w1(args, report, "w1", work, ["ours", "trl", "floor"], args.rounds)
    data["w1"] = results
    title = (
        f"W1: {work['prompts']} prompts × {work['generations']} × {work['tokens']} tokens, one optimizer "
        f"step per generation (bf16 training autocast and bf16 generation: {work.get('bf16', False)}); seconds per step"
    )
    totals = step_table(report, title, {"ours": results["ours"], "TRL 1.16": results["trl"]}, results["floor"])
    gen = generation_table(report, results["floor"])
    trl_phases: dict[str, list[float]] = {}
    for r in results["trl"]:
        for name, value in r["trl_phases"].items():
            trl_phases.setdefault(name, []).append(value)
    report.add("\nTRL's own profiling timers (median per call): " + ", ".join(
        f"{name} {statistics.median(v):.3f} s" for name, v in trl_phases.items()
    ))
    ratio_target(report, "W1 step: TRL / ours (≥1.5×, stretch 2×)", totals["TRL 1.16"], totals["ours"], 1.5)
    ratio_target(report, "W1 step: floor / ours (≥1/1.15 = 0.87)", totals["floor"], totals["ours"], 1 / 1.15)
    ratio_target(
        report, "engine generate throughput / raw LLM.generate (≥0.90)", gen["raw_generate"],
        gen["engine_generate"], 0.9,
    )
    ratio_target(
        report, "engine generate vs transformers generate (≥1.5×)", gen["hf_generate"], gen["engine_generate"], 1.5
    )
    sync = statistics.median(pooled_steps(results["ours"])["sync"])
    ours = totals["ours"][0]
    report.target("weight sync share of our W1 step (≤5%)", f"{100 * sync / ours:.1f}%", sync / ours <= 0.05)


def ratio_target(report: Report, name: str, peer: tuple[float, float], ours: tuple[float, float], goal: float):
    """peer / ours on wall clock (decides) and on CPU time (robust to a loaded machine)."""
    wall, cpu = peer[0] / ours[0], peer[1] / ours[1]
    report.target(name, f"{wall:.2f}× (CPU time {cpu:.2f}×)", wall >= goal)


def section_w2(args, report: Report, data: dict) -> None:
    work = args.w2
    results = run_w1(args, report, "w2", work, ["ours", "trl"], args.rounds_w2)
    data["w2"] = results
    title = (
        f"W2: {work['prompts']} prompts × {work['generations']} × {work['tokens']} tokens (4× the completions, "
        f"2× the length of W1); seconds per step"
    )
    totals = step_table(report, title, {"ours": results["ours"], "TRL 1.16": results["trl"]}, None)
    wall, cpu = (totals["TRL 1.16"][i] / totals["ours"][i] for i in (0, 1))
    report.target("W2 step: TRL / ours", f"{wall:.2f}× (CPU time {cpu:.2f}×)", None)


def section_scaling(args, report: Report, data: dict) -> None:
    runs_by_size = {}
    w1_ours = data.get("w1", {}).get("ours")
    for prompts in args.scaling_prompts:
        work = {**args.w1, "prompts": prompts}
        if prompts == args.w1["prompts"] and w1_ours:
            runs = w1_ours
        else:
            runs = [
                child("grpo_step.py", ["ours", *workload_args(**work, compile=args.compile_ours)])
                for _ in range(args.rounds_scaling)
            ]
        runs_by_size[prompts * work["generations"]] = runs
    data["scaling"] = runs_by_size
    scaling_table(report, runs_by_size, args.w1["tokens"])


def linear_fit(n: list[float], t: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of t = a + b·n."""
    mean_n, mean_t = statistics.fmean(n), statistics.fmean(t)
    slope = sum((a - mean_n) * (b - mean_t) for a, b in zip(n, t)) / sum((a - mean_n) ** 2 for a in n)
    return mean_t - slope * mean_n, slope


def scaling_table(report: Report, runs_by_size: dict[int, list[dict]], tokens: int) -> None:
    """Step time against completions, with a least-squares line, on wall clock and on CPU time."""
    n = sorted(runs_by_size)
    wall = [statistics.median(pooled_steps(runs_by_size[k])["total"]) for k in n]
    cpu = [statistics.median(pooled_steps(runs_by_size[k], "cpu_steps")["total"]) for k in n]
    fits = {"wall": linear_fit(n, wall), "cpu": linear_fit(n, cpu)}
    report.add(f"\n### Scaling: our step vs completions ({tokens} tokens each)\n")
    report.add("| completions | step s | deviation from the line | CPU s | deviation (CPU) | CPU ms per completion |")
    report.add("|---|---|---|---|---|---|")
    worst = {"wall": 0.0, "cpu": 0.0}
    for k, w, c in zip(n, wall, cpu):
        cells = []
        for name, value in (("wall", w), ("cpu", c)):
            a, b = fits[name]
            deviation = (value - (a + b * k)) / value
            worst[name] = max(worst[name], abs(deviation))
            cells.append(f"{value:.2f} | {100 * deviation:+.1f}%")
        report.add(f"| {k} | {' | '.join(cells)} | {1000 * c / k:.1f} |")
    (a, b), (ac, bc) = fits["wall"], fits["cpu"]
    report.add(f"\nlines: step = {a:.2f} s + {1000 * b:.1f} ms × completions (CPU: {ac:.2f} s + {1000 * bc:.1f} ms)")
    report.target(
        "step time linear in completions 32→256 (max deviation from the line ≤15%)",
        f"{100 * worst['wall']:.1f}% (CPU time {100 * worst['cpu']:.1f}%)",
        worst["wall"] <= 0.15,
    )


def section_w3(args, report: Report, data: dict) -> None:
    results: dict[str, list[dict]] = {"ours": [], "peer": []}
    for round_index in range(args.rounds_w3):
        order = ["ours", "peer"] if round_index % 2 == 0 else ["peer", "ours"]
        for variant in order:
            results[variant].append(child("sample_and_score.py", [variant, *workload_args(**args.w3)]))
    data["w3"] = results
    w = args.w3
    report.add(
        f"\n### W3: {w['prompts']} prompts × {w['samples']} samples × {w['tokens']} tokens, then log-probs "
        "under two models (no backward)\n"
    )
    report.add("| variant | total s [min–max] | CPU s | generation s | scoring s | tokens/s | peak RSS MB | runs |")
    report.add("|---|---|---|---|---|---|---|---|")
    totals = {}
    for variant, name in [("ours", "ours: VLLMEngine + chunked scoring"),
                          ("peer", "transformers generate + full-logits scoring")]:
        runs = {k: [v for r in results[variant] for v in r["runs"][k]] for k in ("total", "generation", "scoring")}
        total, low, high = median_range(runs["total"])
        cpu = statistics.median(v for r in results[variant] for v in r["cpu_runs"]["total"])
        totals[variant] = (total, cpu)
        tokens = results[variant][0]["tokens"]
        report.add(
            f"| {name} | {total:.1f} [{low:.1f}–{high:.1f}] | {cpu:.1f} | {statistics.median(runs['generation']):.1f} "
            f"| {statistics.median(runs['scoring']):.1f} | {tokens / total:.0f} "
            f"| {max(r['peak_rss_mb'] for r in results[variant]):.0f} | {len(runs['total'])} |"
        )
    ratio_target(report, "W3: transformers peer / ours (≥2.5×)", totals["peer"], totals["ours"], 2.5)


def section_w4(args, report: Report, data: dict) -> None:
    work = args.w4
    results = run_w1(args, report, "w4", work, ["ours", "trl", "floor"], args.rounds_w4, args.compile_ours_w4)
    data["w4"] = results
    title = (
        f"W4: {work['prompts']} prompts × {work['generations']} completions of prescribed lengths (log-normal, "
        f"median {work['median_length']}, {100 * work['cap_share']:.0f} % at the {work['tokens']}-token cap; "
        f"{results['floor'][0]['tokens_per_step']:.0f} completion tokens per step), one optimizer step per "
        "generation; seconds per step"
    )
    totals = step_table(report, title, {"ours": results["ours"], "TRL 1.16": results["trl"]}, results["floor"])
    floor = results["floor"]
    runs = {k: [v for r in floor for v in r["runs"][k]] for k in floor[0]["runs"]}
    mismatches = {v: sum(r.get("length_mismatches", 0) for r in results[v]) for v in ("ours", "trl")}
    report.add(
        f"\nFloor training pass (median s): length-bucketed micro-batches of ≤ {work['max_tokens_per_microbatch']} "
        f"padded tokens {statistics.median(runs['train_bucketed']):.3f} "
        f"({floor[0]['bucketed_padded_tokens']:.0f} padded tokens with prompts), packed rows of ≤ "
        f"{work['pack_tokens']} tokens {statistics.median(runs['train_packed']):.3f}; the floor uses the faster. "
        f"Generation: our engine {statistics.median(runs['engine_generate']):.3f} s, raw `LLM.generate` "
        f"{statistics.median(runs['raw_generate']):.3f} s. Completions off their prescribed length: ours "
        f"{mismatches['ours']}, TRL {mismatches['trl']}."
    )
    ours = [r for r in results["ours"] if "chunks_per_step" in r]
    if ours:
        report.add(
            f"\nOurs with max_tokens_per_microbatch = {work['ours_max_tokens_per_microbatch']} (padding_free "
            f"{ours[0]['padding_free']}): {statistics.median(r['chunks_per_step'] for r in ours):.0f} forward/backward "
            f"chunks per optimizer step, {statistics.median(r['padded_tokens_per_step'] for r in ours):.0f} tokens "
            "through the model per step (prompts and padding included)."
        )
    ratio_target(report, "W4 step: TRL / ours (≥1.8×)", totals["TRL 1.16"], totals["ours"], 1.8)
    ratio_target(report, "W4 step: floor / ours (≥1/1.15 = 0.87)", totals["floor"], totals["ours"], 1 / 1.15)


def section_logprobs(args, report: Report, data: dict) -> None:
    result = child("logprob_memory.py", [*workload_args(**args.logprobs), "--mode", "both"])
    data["logprobs"] = result
    lp = args.logprobs
    report.add(
        f"\n### Log-probs at vocab {lp['vocab']}: chunked (ours) vs naive full-vocabulary log_softmax, "
        f"{lp['batch']}×{lp['length']} tokens, medians of {lp['repeats']}\n"
    )
    report.add("| pass | method | peak extra MB | seconds [min–max] | CPU seconds |")
    report.add("|---|---|---|---|---|")
    for mode, summary in result.items():
        for method in ("naive", "chunked"):
            r = summary[method]
            low, high = r["seconds_range"]
            report.add(
                f"| {mode} | {method} | {r['peak_mb']:.0f} | {r['seconds']:.2f} [{low:.2f}–{high:.2f}] "
                f"| {r['cpu_seconds']:.2f} |"
            )
    recompute = result["nograd"]
    report.target("log-prob recomputation memory / naive (≤0.15)", f"{recompute['memory_ratio']:.3f}",
                  recompute["memory_ratio"] <= 0.15)
    report.target("log-prob recomputation time / naive (≤1.2×; CPU time in brackets)",
                  f"{recompute['time_ratio']:.2f}× ({recompute['cpu_time_ratio']:.2f}×)",
                  recompute["time_ratio"] <= 1.2)
    grad = result["grad"]
    report.target("training pass (forward+backward) memory / naive", f"{grad['memory_ratio']:.3f}",
                  grad["memory_ratio"] <= 0.15)
    report.target("training pass time / naive (recompute bound: 4/3 in the matmul limit)",
                  f"{grad['time_ratio']:.2f}× ({grad['cpu_time_ratio']:.2f}×)", None)


def section_trl_vllm(args, report: Report, data: dict) -> None:
    result = child("grpo_step.py", ["trl-vllm", *workload_args(**args.w1)])
    data["trl-vllm"] = result
    if result["runs"]:
        report.add("\nTRL with colocated vLLM ran on this machine: add it to the W1 comparison.")
    else:
        report.add(
            f"\nTRL GRPOTrainer with `use_vllm=True, vllm_mode='colocate'` fails here: `{result['error']}` "
            f"(raised at {result['raised_at']}); the TRL peer therefore generates with transformers."
        )


def section_lora_sync(args, report: Report, data: dict) -> None:
    """LoRA sync into the colocated engine: adapter-only vs merge-and-sync (`benchmarks/lora_sync.py`)."""
    result = child("lora_sync.py", ["--size", "1m", "--repeats", "5"] if args.quick else ["--size", "25m"])
    data["lora-sync"] = result
    report.add(
        f"\n### LoRA sync: tiny {result['model']}, r={result['rank']} on {', '.join(result['targets'])} "
        f"({result['adapter_parameters'] / 1e6:.2f}M adapter parameters); ms, median of {result['repeats']} [min–max]\n"
    )
    report.add("| sync | per step | first sync | generation of the batch (s) |")
    report.add("|---|---|---|---|")
    for name, key in (("merge-and-sync", "merge"), ("adapter-only", "adapter")):
        r = result[key]
        report.add(
            f"| {name} | {r['sync_s']['median'] * 1e3:.1f} [{r['sync_s']['min'] * 1e3:.1f}–{r['sync_s']['max'] * 1e3:.1f}] "
            f"| {r['first_sync_s'] * 1e3:.1f} | {r['generate_s']['median']:.2f} |"
        )
    report.target("LoRA sync: merge / adapter-only (not a target)", f"{result['speedup']:.1f}×", None)


def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (otherwise bf16 autocast is emulated and slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def configure(args: argparse.Namespace) -> None:
    both = dict(bf16=args.bf16, attention=args.attention)  # every variant alike
    if args.quick:
        args.w1 = dict(prompts=2, generations=4, tokens=16, micro_batch=8, steps=1, warmup=1, **both)
        args.w2 = dict(prompts=4, generations=4, tokens=32, micro_batch=8, steps=1, warmup=1, **both)
        args.scaling_prompts = [1, 2, 4]
        args.w3 = dict(prompts=4, samples=2, tokens=16, runs=1, **both)
        args.logprobs = dict(vocab=4096, hidden=64, batch=2, length=64, repeats=1)
        args.w4 = dict(
            prompts=2, generations=4, tokens=32, lengths="lognormal", median_length=8, cap_share=0.1, micro_batch=8,
            steps=1, warmup=1, max_tokens_per_microbatch=256, pack_tokens=128, ours_max_tokens_per_microbatch=128,
            **both,
        )  # fmt: skip
        args.rounds = args.rounds or 1
    else:
        args.w1 = dict(prompts=8, generations=8, tokens=128, micro_batch=64, steps=2, warmup=2, **both)
        # one timed step per process: TRL's W2 step alone is about a minute of CPU time here
        args.w2 = dict(prompts=32, generations=8, tokens=256, micro_batch=64, steps=1, warmup=2, **both)
        args.scaling_prompts = [4, 8, 16, 32]
        args.w3 = dict(prompts=64, samples=8, tokens=256, runs=1, **both)
        args.logprobs = dict(vocab=151_936, hidden=256, batch=4, length=512, repeats=3)
        # micro-batch 32 (4 accumulation steps): the padded trainers' eager attention keeps rows × 4 × 525² floats
        # per layer; the floor buckets by ≤ 2048 padded tokens (12 % over the real ones) and packs rows of ≤ 1024;
        # ours: GRPOConfig.max_tokens_per_microbatch 1024 (padding_free auto: bucketed on CPU); single runs, CPU s of
        # forward+backward: budget 1024 13.2-13.6, 2048 13.8-14.1, 4096 15.8-16.9, packed rows of 1024 18.2-19.5
        args.w4 = dict(
            prompts=16, generations=8, tokens=512, lengths="lognormal", median_length=64, cap_share=0.1,
            micro_batch=32, steps=2, warmup=2, max_tokens_per_microbatch=2048, pack_tokens=1024,
            ours_max_tokens_per_microbatch=1024, **both,
        )  # fmt: skip
        args.rounds = args.rounds or 3
    args.rounds_w2 = args.rounds_w2 or 1
    args.rounds_w3 = args.rounds_w3 or 1
    args.rounds_w4 = args.rounds_w4 or (1 if args.quick else 3)
    args.rounds_scaling = args.rounds_scaling or 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes, one repetition")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--rounds", type=int, default=0, help="W1 processes per variant (default 3)")
    parser.add_argument("--rounds-w2", type=int, default=0, help="W2 processes per variant (default 1)")
    parser.add_argument("--rounds-w3", type=int, default=0, help="W3 processes per variant (default 1)")
    parser.add_argument("--rounds-w4", type=int, default=0, help="W4 processes per variant (default 3)")
    parser.add_argument("--rounds-scaling", type=int, default=0, help="processes per scaling size (default 1)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 for both trainers: training-step autocast, and generation (our vLLM "
                        "engine in bf16; TRL's generate runs under the same autocast) (default: when the CPU "
                        "has avx512_bf16 or amx_bf16; TRL's own default is bf16)")
    parser.add_argument("--attention", default="eager", choices=["eager", "sdpa"],
                        help="the transformers model's attention kernel, for every variant alike (eager is TRL's "
                        "best on this machine class: W1 step 4.3 s against 6.0 s with sdpa; docs/performance.md)")
    parser.add_argument("--compile-ours", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile our training model (TrainingArguments.torch_compile; the floor stays a "
                        "plain eager step, as the issue defines it)")
    parser.add_argument("--compile-ours-w4", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile our training model in W4 (token-budget chunks change shape every "
                        "forward: no gain measured, forward+backward 14.1-14.5 CPU s compiled vs 13.8-14.1 eager)")
    parser.add_argument("--compile-trl", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile TRL's training model too (slower here: W1 step 6.9 s against 4.4 s)")
    parser.add_argument("--json", default=None, help="also write every raw result to this file")
    args = parser.parse_args(argv)
    if args.bf16 is None:
        args.bf16 = cpu_has_bf16()
    configure(args)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    import torch

    report, data = Report(), {}
    device = (
        f"GPU: {torch.cuda.get_device_name()} × {torch.cuda.device_count()} (the benchmarks train and generate on it)"
        if torch.cuda.is_available()
        else "no GPU (CPU runs)"
    )
    report.add(
        f"# reasoning performance suite{' (quick)' if args.quick else ''}: {device}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; bf16 training autocast and generation: {args.bf16}; "
        f"attention: {args.attention}; torch.compile: ours {args.compile_ours} (W4: {args.compile_ours_w4}), TRL {args.compile_trl}"
    )
    started = time.perf_counter()
    for section in SECTIONS:
        if section in sections:
            globals()[f"section_{section.replace('-', '_')}"](args, report, data)
    report.add("\n### Targets\n")
    report.add("| target | measured | met |")
    report.add("|---|---|---|")
    for name, value, ok in report.targets:
        report.add(f"| {name} | {value} | {'–' if ok is None else ('yes' if ok else 'NO')} |")
    report.add(f"\nsuite time: {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"report": report.lines, "results": data}, indent=1))


if __name__ == "__main__":
    main()
