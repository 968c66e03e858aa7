"""Peak memory and time of per-token log-probs: chunked (ours) vs naive full-vocabulary logits.

Two passes are measured: `grad` (forward + backward, as in the training loss) and `nograd` (the
log-prob recomputation of π_old / π_ref). Each method runs in a fresh subprocess and reports the
growth of its peak resident memory (ru_maxrss) over the inputs it was given, so the numbers are
comparable on the CPU. `ours` is `token_logprobs_from_hidden` with the trainer's default chunk
(`logprob_chunk_size` 1024 rows, cut to the 2**24-logit budget); `naive` is `h @ Wᵀ` then
`log_softmax` and gather. Methods alternate, `--repeats` times; medians are printed.

    python benchmarks/logprob_memory.py [--vocab 151936] [--hidden 256] [--batch 4] [--length 512]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def run_one(method: str, grad: bool, vocab: int, hidden: int, batch: int, length: int, chunk: int) -> dict:
    import torch

    from reasoning.objectives.logprobs import token_logprobs_from_hidden, token_logprobs_from_logits

    torch.manual_seed(0)
    h = torch.randn(batch, length, hidden, requires_grad=grad)
    w = torch.randn(vocab, hidden).mul_(0.02).requires_grad_(grad)  # in place: no transient copy
    targets = torch.randint(0, vocab, (batch, length))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.set_grad_enabled(grad):
        if method == "naive":
            logp = token_logprobs_from_logits(h @ w.t(), targets)
        else:
            logp, _ = token_logprobs_from_hidden(h, w, targets, chunk_size=chunk)
        if grad:
            logp.sum().backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": (peak - baseline) / 1024}


def measure(args: argparse.Namespace, mode: str) -> dict:
    """Alternate naive / chunked subprocesses `args.repeats` times; medians and ranges."""
    runs: dict[str, list[dict]] = {"naive": [], "chunked": []}
    for _ in range(args.repeats):
        for method in runs:
            command = [sys.executable, __file__, "--child", method, "--mode", mode]
            for name in ("vocab", "hidden", "batch", "length", "chunk"):
                command += [f"--{name}", str(getattr(args, name))]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[method].append(json.loads(out.strip().splitlines()[-1]))
    summary = {}
    for method, values in runs.items():
        seconds = [v["seconds"] for v in values]
        peaks = [v["peak_mb"] for v in values]
        summary[method] = {
            "seconds": statistics.median(seconds),
            "seconds_range": [min(seconds), max(seconds)],
            "cpu_seconds": statistics.median(v["cpu_seconds"] for v in values),
            "peak_mb": statistics.median(peaks),
        }
    naive, chunked = summary["naive"], summary["chunked"]
    summary["memory_ratio"] = chunked["peak_mb"] / naive["peak_mb"]
    summary["time_ratio"] = chunked["seconds"] / naive["seconds"]
    summary["cpu_time_ratio"] = chunked["cpu_seconds"] / naive["cpu_seconds"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024, help="rows per chunk (the trainer's default)")
    parser.add_argument("--mode", choices=["grad", "nograd", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per method (medians)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_one(
            args.child, args.mode == "grad", args.vocab, args.hidden, args.batch, args.length, args.chunk
        )
        print(json.dumps(result))
        return
    modes = ["grad", "nograd"] if args.mode == "both" else [args.mode]
    results = {mode: measure(args, mode) for mode in modes}
    logits_mb = args.batch * args.length * args.vocab * 4 / 2**20
    print(
        f"vocab {args.vocab}, hidden {args.hidden}, {args.batch}x{args.length} tokens "
        f"(full fp32 logits would be {logits_mb:.0f} MB); chunk {args.chunk} rows; "
        f"medians of {args.repeats}"
    )
    print(f"{'pass':<8}{'method':<10}{'peak MB':>10}{'seconds':>10}{'CPU s':>10}")
    for mode, summary in results.items():
        for method in ("naive", "chunked"):
            r = summary[method]
            print(f"{mode:<8}{method:<10}{r['peak_mb']:>10.0f}{r['seconds']:>10.2f}{r['cpu_seconds']:>10.2f}")
        print(
            f"{mode}: chunked uses {summary['memory_ratio']:.3f}x the memory of naive and "
            f"{summary['time_ratio']:.2f}x its time ({summary['cpu_time_ratio']:.2f}x its CPU time)"
        )
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
