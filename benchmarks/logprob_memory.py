"""Peak memory and time of per-token log-probs: chunked (ours) vs naive full logits, forward + backward.

Each method runs in a fresh subprocess and reports the growth of its peak resident memory
(ru_maxrss) over the inputs it was given, so the numbers are comparable on the CPU.

    python benchmarks/logprob_memory.py [--vocab 151936] [--hidden 256] [--batch 4] [--length 512]
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def run_one(method: str, vocab: int, hidden: int, batch: int, length: int, chunk: int) -> dict:
    import torch

    from reasoning.objectives.logprobs import token_logprobs_from_hidden, token_logprobs_from_logits

    torch.manual_seed(0)
    h = torch.randn(batch, length, hidden, requires_grad=True)
    w = (0.02 * torch.randn(vocab, hidden)).requires_grad_(True)
    targets = torch.randint(0, vocab, (batch, length))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "naive":
        logp = token_logprobs_from_logits(h @ w.t(), targets)
    else:
        logp, _ = token_logprobs_from_hidden(h, w, targets, chunk_size=chunk)
    logp.sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "seconds": seconds, "peak_mb": (peak - baseline) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.vocab, args.hidden, args.batch, args.length, args.chunk)))
        return
    results = {}
    for method in ("naive", "chunked"):
        command = [
            sys.executable,
            __file__,
            "--child",
            method,
            "--vocab",
            str(args.vocab),
            "--hidden",
            str(args.hidden),
            "--batch",
            str(args.batch),
            "--length",
            str(args.length),
            "--chunk",
            str(args.chunk),
        ]
        out = (
            subprocess.run(command, capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        results[method] = json.loads(out)
    logits_mb = args.batch * args.length * args.vocab * 4 / 2**20
    print(
        f"vocab {args.vocab}, hidden {args.hidden}, {args.batch}x{args.length} tokens "
        f"(full fp32 logits would be {logits_mb:.0f} MB); chunk {args.chunk} rows"
    )
    print(f"{'method':<10}{'peak MB':>10}{'seconds':>10}")
    for r in results.values():
        print(f"{r['method']:<10}{r['peak_mb']:>10.0f}{r['seconds']:>10.2f}")
    naive, chunked = results["naive"], results["chunked"]
    print(
        f"memory: chunked uses {chunked['peak_mb'] / naive['peak_mb']:.3f}x of naive; "
        f"time: {chunked['seconds'] / naive['seconds']:.2f}x of naive"
    )


if __name__ == "__main__":
    main()
