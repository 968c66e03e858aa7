"""LoRA weight sync into the colocated vLLM engine: adapter-only vs merge-and-sync.

A tiny Qwen2 model (default "25m") with a PEFT LoRA adapter (default r=16, α=32) on every attention
and MLP projection (q, k, v, o, gate, up, down), B nonzero. Before each timed sync the adapter is
changed in place (a fixed-seed perturbation standing in for an optimizer step), so every sync moves
new values. Two engines, one after the other in this process:

- merge: `VLLMEngine(lora_sync="merge")`, the default: W + (α/r)·B·A merged while streaming, every
  weight reloaded in place (`iter_full_weights` -> `reload_weights`), prefix cache reset;
- adapter: `VLLMEngine(lora_sync="adapter")`: vLLM's LoRA layers; the first sync pushes the base
  once, each later one only A and B (`adapter_state` -> `LoRAModel.from_lora_tensors` -> the slot).

Reported: the median (and all values) of `--repeats` timed `sync_weights` calls per engine after one
untimed warm-up sync; the adapter engine's first sync (base + adapter); the export alone (merging
and streaming the full weights / copying the adapter out); generation of the same greedy batch on
both engines (vLLM's LoRA kernels cost time on every forward); vLLM's public directory route for
comparison (the adapter written to tmpfs with `save_pretrained` and loaded with `add_lora`, timed per
sync the same way, after the rest); and, as a check, the largest
difference between the two engines' log-probs of that batch after the same final adapter (< 1e-4).

    python benchmarks/lora_sync.py [--size 25m] [--rank 16] [--repeats 7] [--json out.json]

Prints `RESULT {json}` last (as the other benchmarks, for `suite.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="25m", help="tiny model size (reasoning.models.tiny.TINY_SIZES)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed syncs per engine (median reported; >= 5)"
    )
    parser.add_argument("--prompts", type=int, default=16, help="prompts of the generation batch")
    parser.add_argument(
        "--tokens", type=int, default=64, help="tokens per completion of the generation batch"
    )
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args()

    import torch

    from reasoning.models.lora import adapter_state, apply_lora
    from reasoning.models.tiny import build_tiny_model, count_parameters
    from reasoning.rollout import Sampling
    from reasoning.rollout.vllm_engine import VLLMEngine, iter_full_weights

    path = tempfile.mkdtemp(prefix="lora-sync-")
    model, tokenizer = build_tiny_model(args.size, path, max_positions=512)
    base_parameters = count_parameters(model)
    policy = apply_lora(model, {"r": args.rank, "lora_alpha": args.alpha, "target_modules": TARGETS,
                                "init_lora_weights": False})  # fmt: skip
    lora = {n: p for n, p in policy.named_parameters() if "lora_" in n}
    start_values = {n: p.detach().clone() for n, p in lora.items()}
    prompts = [
        tokenizer(f"Q:{i}+{i * 7}\nT:", add_special_tokens=False)["input_ids"] for i in range(args.prompts)
    ]
    greedy = Sampling(temperature=0, max_tokens=args.tokens, ignore_eos=True)

    @torch.no_grad()
    def training_step(generator: torch.Generator) -> None:
        """Stand-in for an optimizer step: every adapter tensor moves."""
        for p in lora.values():
            p.add_(torch.randn(p.shape, generator=generator) * 1e-3)

    def directory_route(engine, generator: torch.Generator) -> list[float]:
        """vLLM's public path, for comparison: the adapter written to tmpfs (`save_pretrained`) and
        loaded from there (`LLM.llm_engine.add_lora(LoRARequest(lora_path=...))`), per sync."""
        from vllm.lora.request import LoRARequest

        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        times = []
        with tempfile.TemporaryDirectory(prefix="lora-dir-", dir=shm) as root:
            for i in range(args.repeats):
                training_step(generator)
                start = time.perf_counter()
                target = os.path.join(root, str(i))
                policy.save_pretrained(target)
                engine.llm.llm_engine.add_lora(LoRARequest(f"directory-{i}", 10_000 + i, target))
                engine.llm.reset_prefix_cache()  # as sync_weights does
                times.append(time.perf_counter() - start)
        return times

    def run(mode: str) -> dict:
        with torch.no_grad():
            for n, p in lora.items():
                p.copy_(start_values[n])
        generator = torch.Generator().manual_seed(0)
        engine = VLLMEngine(path, max_model_len=512, lora_sync=mode,
                            **({"max_lora_rank": args.rank} if mode == "adapter" else {}))  # fmt: skip
        result: dict = {}
        try:
            start = time.perf_counter()
            engine.sync_weights(policy)  # adapter: the base is pushed here, once
            result["first_sync_s"] = time.perf_counter() - start
            assert engine.last_sync == mode, (engine.last_sync, mode)
            times, export = [], []
            for _ in range(args.repeats):
                training_step(generator)
                start = time.perf_counter()
                engine.sync_weights(policy)
                times.append(time.perf_counter() - start)
                start = time.perf_counter()
                if mode == "adapter":
                    adapter_state(policy)
                else:
                    for _name, _tensor in iter_full_weights(policy):
                        pass
                export.append(time.perf_counter() - start)
            result["sync_s"] = summary(times)
            result["export_s"] = summary(export)
            engine.generate(prompts, greedy)  # warm-up
            generation = []
            for _ in range(3):
                start = time.perf_counter()
                groups = engine.generate(prompts, greedy)
                generation.append(time.perf_counter() - start)
            result["generate_s"] = summary(generation)
            result["logprobs"] = [r.logprobs for g in groups for r in g]
            if mode == "adapter":  # last: loading other adapters evicts the in-memory one
                result["directory_sync_s"] = summary(directory_route(engine, generator))
        finally:
            engine.close()
        return result

    merge = run("merge")
    adapter = run("adapter")
    difference = max(
        abs(a - b)
        for seq_a, seq_b in zip(merge.pop("logprobs"), adapter.pop("logprobs"), strict=True)
        for a, b in zip(seq_a, seq_b, strict=True)
    )
    adapter_parameters = sum(p.numel() for p in lora.values())
    result = {
        "model": args.size,
        "parameters": base_parameters,
        "adapter_parameters": adapter_parameters,
        "rank": args.rank,
        "targets": TARGETS,
        "repeats": args.repeats,
        "generation_batch": f"{args.prompts} prompts x {args.tokens} tokens, greedy",
        "torch_threads": torch.get_num_threads(),
        "merge": merge,
        "adapter": adapter,
        "speedup": merge["sync_s"]["median"] / adapter["sync_s"]["median"],
        "logprob_max_difference": difference,
        "load_average": [round(x, 1) for x in os.getloadavg()],  # other jobs on the machine, at the end
    }
    print(
        f"tiny {args.size}: {base_parameters / 1e6:.1f}M parameters, LoRA r={args.rank} on {len(TARGETS)} "
        f"projections: {adapter_parameters / 1e6:.2f}M adapter parameters"
    )
    for name, r in (("merge-and-sync", merge), ("adapter-only", adapter)):
        print(
            f"{name:<16} sync median {r['sync_s']['median'] * 1e3:7.1f} ms "
            f"[{r['sync_s']['min'] * 1e3:.1f}-{r['sync_s']['max'] * 1e3:.1f}] over {args.repeats}; "
            f"first {r['first_sync_s'] * 1e3:.1f} ms; export {r['export_s']['median'] * 1e3:.1f} ms; "
            f"generate {r['generate_s']['median']:.2f} s"
        )
    directory = adapter["directory_sync_s"]
    print(
        f"{'adapter via tmpfs':<16} sync median {directory['median'] * 1e3:7.1f} ms "
        f"[{directory['min'] * 1e3:.1f}-{directory['max'] * 1e3:.1f}] (vLLM's directory route, for comparison)"
    )
    print(
        f"adapter-only is {result['speedup']:.1f}x faster to sync; log-probs differ by at most {difference:.2e}; "
        f"load average {result['load_average']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
