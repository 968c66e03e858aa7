"""W3, generation-heavy: sample, then score every sample under two models (no backward).

As in the variational pipeline's sampling and scoring stages: `--prompts` × `--samples` completions
of exactly `--tokens` new tokens at temperature 1 from the policy, then the per-token log-probs of
every completion under the policy and under a second model of the same shape (the policy's
weights plus seeded noise).
The W1 model (`grpo_step.build_model`) is used for both. One process per variant, one JSON line:

    python benchmarks/sample_and_score.py ours [--prompts 64 --samples 8 --tokens 256 --runs 1]
    python benchmarks/sample_and_score.py peer [same options]

ours: `VLLMEngine.generate`, whose returned sampling log-probs are the policy's (temperature 1, no
top-k/top-p: the sampling distribution is π itself; `--rescore-policy` recomputes them instead),
then `reasoning.models.scoring.span_token_logprobs` (final hidden states, chunked log-softmax) under
the second model; the agreement of engine and transformers log-probs is checked on 8 sequences.
peer: transformers `generate` (all prompts in one
batch, `min_new_tokens` = `max_new_tokens`), then a plain scoring pass: full logits of each batch,
`log_softmax`, gather. Each timed run follows one small untimed warm-up call of each piece.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_step import build_model, peak_rss_mb  # noqa: E402


def prompts_for(tokenizer, count: int) -> list[list[int]]:
    from reasoning.data.datasets import load_records
    from reasoning.data.templates import PlainTemplate, encode

    template = PlainTemplate()
    rows = load_records(f"synthetic:addition?digits=3&n={count}&seed=0&split=train")
    return [encode(tokenizer, template.prior_prompt(r["question"])) for r in rows]


def load_models(path_policy: str, path_other: str, attention: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM

    _, tokenizer = build_model(path_policy)
    other, _ = build_model(path_other)
    # a second, different model of the same shape: the policy's weights plus seeded noise
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    other.save_pretrained(path_other)
    models = [
        AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, attn_implementation=attention).eval()
        for p in (path_policy, path_other)
    ]
    return tokenizer, models


def score_ours(models, sequences, starts, engine_logprobs, batch_size, rescore_policy):
    """Log-probs under both models. The policy's are the engine's sampling log-probs (at temperature 1
    without top-k/top-p they are log π of the sampled tokens) unless `rescore_policy`."""
    import torch

    from reasoning.models.scoring import span_token_logprobs

    if rescore_policy:
        return [span_token_logprobs(m, sequences, starts, batch_size=batch_size) for m in models]
    policy = [torch.tensor(values) for values in engine_logprobs]
    return [policy, span_token_logprobs(models[1], sequences, starts, batch_size=batch_size)]


def score_peer(models, ids, mask, prompt_width, batch_size):
    """Full logits per batch -> log_softmax -> gather the completion tokens."""
    import torch

    out = []
    with torch.no_grad():
        for model in models:
            parts = []
            for lo in range(0, ids.shape[0], batch_size):
                logits = model(input_ids=ids[lo : lo + batch_size], attention_mask=mask[lo : lo + batch_size]).logits
                logp = torch.log_softmax(logits[:, prompt_width - 1 : -1].float(), dim=-1)
                parts.append(logp.gather(-1, ids[lo : lo + batch_size, prompt_width:, None]).squeeze(-1))
            out.append(torch.cat(parts))
    return out


def run(
    variant: str,
    prompts: int,
    samples: int,
    tokens: int,
    runs: int,
    batch_size: int,
    rescore_policy: bool,
    bf16: bool = False,
    attention: str = "sdpa",
) -> dict:
    """With `bf16`, both variants compute in bf16: our engine is built in bf16, and the transformers
    passes (the peer's generate and scoring, our scoring) run under bf16 autocast."""
    import contextlib

    import torch

    root = tempfile.mkdtemp(prefix="bench-w3-")
    tokenizer, models = load_models(f"{root}/policy", f"{root}/other", attention)
    precision = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    )
    prompt_ids = prompts_for(tokenizer, prompts)
    times: dict[str, list[float]] = {"generation": [], "scoring": [], "total": []}
    cpu_times: dict[str, list[float]] = {"generation": [], "scoring": [], "total": []}
    if variant == "ours":
        from reasoning.rollout import Sampling
        from reasoning.rollout.vllm_engine import VLLMEngine

        kv_gib = max(0.5, 2.5 * prompts * samples * (tokens + 32) * 6 * 2 * 256 * 4 / 2**30)
        engine = VLLMEngine(
            f"{root}/policy",
            max_model_len=tokens + 64,
            cpu_kv_cache_gib=kv_gib,
            dtype="bfloat16" if bf16 else "float32",
        )

        def generate(count: int, new: int):
            sampling = Sampling(temperature=1.0, max_tokens=new, seed=0, ignore_eos=True)
            groups = engine.generate(prompt_ids[:count], sampling, samples)
            flat = [r for g in groups for r in g]
            sequences = [r.prompt_ids + r.completion_ids for r in flat]
            return sequences, [len(r.prompt_ids) for r in flat], [r.logprobs for r in flat]

        def score(generated):
            with precision():
                return score_ours(models, *generated, batch_size, rescore_policy)
    else:
        width = max(len(p) for p in prompt_ids)
        ids = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left padding for generation
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        policy = models[0]

        def generate(count: int, new: int):
            torch.manual_seed(0)
            with torch.no_grad(), precision():
                out = policy.generate(
                    input_ids=ids[:count],
                    attention_mask=mask[:count],
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    num_return_sequences=samples,
                    pad_token_id=0,
                )
            full_mask = torch.cat([mask[:count].repeat_interleave(samples, 0), torch.ones_like(out[:, width:])], 1)
            return out, full_mask

        def score(generated):
            with precision():
                return score_peer(models, *generated, width, batch_size)

    score(generate(2, 8))  # warm-up
    for _ in range(runs):
        marks = [(time.perf_counter(), time.process_time())]
        generated = generate(prompts, tokens)
        marks.append((time.perf_counter(), time.process_time()))
        scores = score(generated)
        marks.append((time.perf_counter(), time.process_time()))
        for record, i in ((times, 0), (cpu_times, 1)):
            record["generation"].append(marks[1][i] - marks[0][i])
            record["scoring"].append(marks[2][i] - marks[1][i])
            record["total"].append(marks[2][i] - marks[0][i])
    agreement = None
    if variant == "ours":
        engine.close()
        count = sum(len(s) for s in scores[0]) + sum(len(s) for s in scores[1])
        count //= 2
        # the engine's log-probs are the policy's: check on a few sequences against transformers
        from reasoning.models.scoring import span_token_logprobs

        sequences, starts, engine_logprobs = generated
        check = span_token_logprobs(models[0], sequences[:8], starts[:8])
        agreement = max(
            (torch.tensor(e) - c).abs().max().item() for e, c in zip(engine_logprobs[:8], check)
        )
    else:
        count = scores[0].numel()
    if count != prompts * samples * tokens:
        raise RuntimeError(f"scored {count} tokens, expected {prompts * samples * tokens}")
    return {
        "variant": variant,
        "workload": dict(prompts=prompts, samples=samples, tokens=tokens, score_batch=batch_size),
        "runs": times,
        "cpu_runs": cpu_times,
        "median": {k: statistics.median(v) for k, v in times.items()},
        "tokens": prompts * samples * tokens,
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
        "rescore_policy": rescore_policy,
        "bf16": bf16,
        "attention": attention,
        "engine_vs_transformers_logprob_max_diff": agreement,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=["ours", "peer"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=1, help="timed runs in this process")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per scoring forward pass")
    parser.add_argument(
        "--rescore-policy",
        action="store_true",
        help="ours: recompute the policy's log-probs with transformers instead of using the engine's",
    )
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                        help="both variants in bf16 (our engine's dtype; autocast for transformers passes)")
    parser.add_argument("--attention", default="sdpa", help="transformers attention kernel, both variants")
    args = parser.parse_args(argv)
    result = run(
        args.variant,
        args.prompts,
        args.samples,
        args.tokens,
        args.runs,
        args.batch_size,
        args.rescore_policy,
        bf16=args.bf16,
        attention=args.attention,
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
