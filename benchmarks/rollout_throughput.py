"""Rollout throughput: our vLLM engine vs raw `LLM.generate` vs transformers `generate`.

A ~6M-parameter tiny model, 64 sequences × 128 new tokens (EOS ignored so every sequence has
exactly 128 tokens), one warm-up call each, then the best of `--repeats` timed calls.
Prints tokens/s and the ratios engine/raw and engine/transformers.

    python benchmarks/rollout_throughput.py [--size 6m] [--sequences 64] [--tokens 128]
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="6m")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from reasoning.models.tiny import build_tiny_model, count_parameters
    from reasoning.rollout import Sampling
    from reasoning.rollout.hf import HFEngine
    from reasoning.rollout.vllm_engine import VLLMEngine

    path = tempfile.mkdtemp(prefix="throughput-")
    model, tokenizer = build_tiny_model(args.size, path, max_positions=512)
    prompts = [
        tokenizer(f"Q:{i}+{i * 7}\nT:", add_special_tokens=False)["input_ids"] for i in range(args.sequences)
    ]
    sampling = Sampling(temperature=1.0, max_tokens=args.tokens, seed=0, ignore_eos=True)
    total = args.sequences * args.tokens

    engine = VLLMEngine(path, max_model_len=512)
    ours = best_time(lambda: engine.generate(prompts, sampling), args.repeats)
    raw_params = SamplingParams(temperature=1.0, max_tokens=args.tokens, seed=0, ignore_eos=True)
    raw_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    raw = best_time(lambda: engine.llm.generate(raw_prompts, raw_params, use_tqdm=False), args.repeats)
    start = time.perf_counter()
    engine.sync_weights(model)
    sync = time.perf_counter() - start
    engine.close()
    hf = HFEngine(model=model.eval(), tokenizer=tokenizer, batch_size=args.sequences)
    transformers_time = best_time(lambda: hf.generate(prompts, sampling), 1)

    print(
        f"model: tiny {args.size} ({count_parameters(model) / 1e6:.1f}M parameters), "
        f"{args.sequences} sequences x {args.tokens} tokens"
    )
    print(f"{'backend':<28}{'seconds':>10}{'tokens/s':>12}")
    for name, seconds in [
        ("reasoning VLLMEngine", ours),
        ("raw vllm LLM.generate", raw),
        ("transformers generate", transformers_time),
    ]:
        print(f"{name:<28}{seconds:>10.2f}{total / seconds:>12.0f}")
    print(
        f"engine / raw vLLM: {raw / ours:.2f}x throughput;  engine / transformers: {transformers_time / ours:.2f}x"
    )
    print(f"sync_weights (in-place reload + prefix-cache reset): {sync:.3f} s")


if __name__ == "__main__":
    main()
