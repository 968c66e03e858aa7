"""Rollout throughput: our vLLM engine vs raw `LLM.generate` vs transformers `generate`.

A ~6M-parameter tiny model ("6m"), `--prompts` × `--n` sequences of exactly `--tokens` new tokens
(EOS ignored), sampled at temperature 1. Each backend gets one warm-up call, then the best of
`--repeats` timed calls. Transformers runs first, before vLLM binds this process's CPU threads.
Also times `VLLMEngine.sync_weights` (streaming the trainer's weights into the engine in place).

    python benchmarks/rollout_throughput.py [--size 6m] [--prompts 64] [--n 1] [--tokens 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Warm up once, then return the fastest of `repeats` timed calls and that call's result."""
    fn()
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, result = elapsed, out
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="6m", help="tiny model size (reasoning.models.tiny.TINY_SIZES)")
    parser.add_argument("--prompts", type=int, default=64, help="number of distinct prompts")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per backend (best is kept)")
    parser.add_argument("--sync-repeats", type=int, default=5, help="timed sync_weights calls (median)")
    args = parser.parse_args()

    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from reasoning.models.tiny import build_tiny_model, count_parameters
    from reasoning.rollout import Sampling
    from reasoning.rollout.hf import HFEngine
    from reasoning.rollout.vllm_engine import VLLMEngine, iter_full_weights

    path = tempfile.mkdtemp(prefix="throughput-")
    model, tokenizer = build_tiny_model(args.size, path, max_positions=512)
    model.eval()
    prompts = [
        tokenizer(f"Q:{i}+{i * 7}\nT:", add_special_tokens=False)["input_ids"] for i in range(args.prompts)
    ]
    sampling = Sampling(temperature=1.0, max_tokens=args.tokens, seed=0, ignore_eos=True)
    total = args.prompts * args.n * args.tokens

    def count(groups) -> int:
        return sum(len(r.completion_ids) for g in groups for r in g)

    hf = HFEngine(model=model, tokenizer=tokenizer, batch_size=args.prompts)
    hf_time, hf_out = best_time(lambda: hf.generate(prompts, sampling, args.n), args.repeats)
    assert count(hf_out) == total, (count(hf_out), total)

    engine = VLLMEngine(path, max_model_len=512)
    ours, ours_out = best_time(lambda: engine.generate(prompts, sampling, args.n), args.repeats)
    assert count(ours_out) == total, (count(ours_out), total)
    raw_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    same_params = engine.sampling_params(sampling, args.n)
    raw, raw_out = best_time(
        lambda: engine.llm.generate(raw_prompts, same_params, use_tqdm=False), args.repeats
    )
    assert sum(len(c.token_ids) for o in raw_out for c in o.outputs) == total
    bare_params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.tokens, seed=0, ignore_eos=True)
    bare, _ = best_time(lambda: engine.llm.generate(raw_prompts, bare_params, use_tqdm=False), args.repeats)

    sync_times, stream_times = [], []
    for _ in range(args.sync_repeats):
        start = time.perf_counter()
        engine.sync_weights(model)
        sync_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _name, _tensor in iter_full_weights(model):
            pass
        stream_times.append(time.perf_counter() - start)
    # the engine still generates what transformers does after the syncs (a cheap sanity check)
    greedy = Sampling(temperature=0, max_tokens=16)
    assert [g[0].completion_ids for g in engine.generate(prompts[:4], greedy)] == [
        g[0].completion_ids for g in hf.generate(prompts[:4], greedy)
    ]
    engine.close()

    print(
        f"model: tiny {args.size} ({count_parameters(model) / 1e6:.2f}M parameters), "
        f"{args.prompts} prompts x n={args.n} x {args.tokens} tokens = {total} tokens, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(f"{'backend':<44}{'seconds':>9}{'tokens/s':>11}")
    for name, seconds in [
        ("reasoning VLLMEngine.generate", ours),
        ("raw vllm LLM.generate (same params)", raw),
        ("raw vllm LLM.generate (no logprobs)", bare),
        ("transformers generate (HFEngine)", hf_time),
    ]:
        print(f"{name:<44}{seconds:>9.2f}{total / seconds:>11.0f}")
    print(f"engine / raw vLLM throughput: {raw / ours:.2f}x;  engine / transformers: {hf_time / ours:.2f}x")
    print(
        f"sync_weights (stream + in-place reload + prefix-cache reset): median "
        f"{statistics.median(sync_times) * 1e3:.1f} ms over {len(sync_times)} "
        f"(of which iterating the weights: {statistics.median(stream_times) * 1e3:.1f} ms)"
    )


if __name__ == "__main__":
    main()
