"""Inference-time scaling with N sampled rationales: Bayesian inference scaling (BiN), best-of-N, majority.

For a question x the model samples N rationales z_1..z_N ~ π(z|x) (the completions cut before the
template's answer marker, at a token boundary), and decodes one answer a_i per rationale (greedy
after z_i and the marker; or the answer written in the sample itself). With the length-normalised
answer log-likelihood

    ℓ(a | x, z) = (1/|a|) Σ_t log π(a_t | x, z, a_<t)

over the answer's own tokens (with the template's answer suffix and EOS: `templates.answer_layout`
with `score_eos=True`), the three selectors are:

- `majority`: the most frequent a_i (ties: the one seen first);
- `bon` (best-of-N ranked by answer likelihood): a_{i*} with i* = argmax_i ℓ(a_i | x, z_i);
- `bin` (LaCoT's Bayesian inference scaling): each distinct answer a among a_1..a_N is scored by
  s(a) = (1/N) Σ_i ℓ(a | x, z_i), the mean over *all* rationales, and the argmax is chosen. It
  marginalises over rationales instead of trusting the single most confident one.

Scores come from a transformers model (the evaluated checkpoint); rationales from any rollout
engine. Results at every N in `ns` reuse the first N of the same max(ns) samples.
The diversity metrics of a group of samples (`distinct_correct`, `pairwise_diversity`) and the answer
key (`answer_key`) are `reasoning.eval.metrics`'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from reasoning.data.templates import Template, answer_layout, encode, template_for
from reasoning.eval.benchmarks import BENCHMARKS, Benchmark, load_benchmark, synthetic_benchmark
from reasoning.eval.evaluate import (
    check_engine_lengths,
    engine_settings,
    engine_tokenizer,
    fit_lengths,
    hf_device_kwargs,
    length_needs,
    opened_engine,
    sample_batches,
    start_results,
)
from reasoning.eval.metrics import answer_key, distinct_correct, pairwise_diversity
from reasoning.models.scoring import answer_logprobs
from reasoning.rollout import RolloutEngine, Sampling
from reasoning.rollout.hf import choose_device

METHODS = ("bin", "bon", "majority")


# --------------------------------------------------------------------------- small pieces


def find_first(ids: Sequence[int], pattern: Sequence[int]) -> int:
    """Start of the first occurrence of `pattern` in `ids`, or −1."""
    pattern = list(pattern)
    width = len(pattern)
    if width == 0:
        return -1
    for start in range(len(ids) - width + 1):
        if list(ids[start : start + width]) == pattern:
            return start
    return -1


def rationale_ids(
    completion_ids: Sequence[int], marker_ids: Sequence[int], stop_ids: Sequence[int]
) -> list[int]:
    """The rationale z of a completion: its tokens before the first answer marker (stop tokens dropped)."""
    ids = [t for t in completion_ids if t not in set(stop_ids)]
    cut = find_first(ids, marker_ids)
    return ids[:cut] if cut >= 0 else ids


def select_majority(keys: Sequence[str | None]) -> int | None:
    """Index of the first sample carrying the most frequent answer key (None keys do not vote)."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    winner = min(counts, key=lambda k: (-counts[k], first[k]))
    return first[winner]


def select_bon(own_scores: Sequence[float], keys: Sequence[str | None]) -> int | None:
    """Index i* = argmax_i ℓ(a_i | x, z_i) over samples with an answer (ties: the first)."""
    best, index = -float("inf"), None
    for i, (score, key) in enumerate(zip(own_scores, keys)):
        if key is not None and (index is None or score > best):
            best, index = score, i
    return index


def bin_scores(loglik: torch.Tensor) -> torch.Tensor:
    """`loglik [Z, A]` = ℓ(a_j | x, z_i) -> `[A]`: s(a_j) = (1/Z) Σ_i ℓ(a_j | x, z_i)."""
    return loglik.mean(dim=0)


def select_bin(loglik: torch.Tensor) -> int | None:
    """Index of the answer column with the highest `bin_scores` (None for no candidates)."""
    if loglik.numel() == 0:
        return None
    return int(torch.argmax(bin_scores(loglik)).item())


@torch.no_grad()
def answer_loglik(
    model: torch.nn.Module,
    tokenizer,
    template: Template,
    prompt_ids: Sequence[int],
    pairs: Sequence[tuple[Sequence[int], str]],
    batch_size: int = 64,
) -> list[float]:
    """ℓ(a | x, z) for each (rationale ids z, answer a): mean log-prob of the answer's own tokens."""
    if not pairs:
        return []
    laid_out = [answer_layout(template, tokenizer, prompt_ids, z, a, score_eos=True) for z, a in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scored = answer_logprobs(model, laid_out, pad_id=pad, batch_size=batch_size)
    return [float(logp[mask].mean()) for logp, mask in zip(scored.answer, scored.answer_mask)]


# --------------------------------------------------------------------------- evaluation


def resolve_benchmark(name: str) -> Benchmark:
    """A named benchmark, or `synthetic:SPEC` (e.g. `synthetic:countdown?max_number=9&n=200&split=test`):
    the held-out problems of an embedded task with its own settings, graded by its verifier."""
    if not name.startswith("synthetic:"):
        if name not in BENCHMARKS:
            raise ValueError(
                f"unknown benchmark {name!r}; available: {', '.join(sorted(BENCHMARKS))} or synthetic:SPEC"
            )
        return BENCHMARKS[name]
    return synthetic_benchmark(name, name.removeprefix("synthetic:"))


def _powers(n: int) -> list[int]:
    ns, k = [], 1
    while k < n:
        ns.append(k)
        k *= 2
    return [*ns, n]


def default_ns(n: int) -> list[int]:
    """N values reported for `--n n`: the powers of two below n (from 4) and n itself."""
    return [k for k in _powers(n) if k >= 4 or k == n]


def scaling_eval(
    model_path: str,
    benchmarks: list[str],
    *,
    ns: Sequence[int] = (4, 8, 16),
    methods: Sequence[str] = METHODS,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_tokens: int | None = None,
    answer_decoding: str = "greedy",
    answer_max_tokens: int = 32,
    limit: int | None = None,
    engine: str | RolloutEngine = "hf",
    scorer: torch.nn.Module | None = None,
    dtype: str = "float32",
    seed: int = 0,
    batch_size: int = 64,
    output_dir: str | Path | None = None,
    console: Console | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    benchmark_source: str = "local",
    benchmarks_dir: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Accuracy of `methods` (bin, bon, majority) at each N in `ns`, per benchmark.

    Samples max(ns) rationales per problem at `temperature` with `engine`, decodes an answer per
    rationale (`answer_decoding`: "greedy" after the rationale and the answer marker, or "sampled":
    the answer written in the sample), scores answers with `scorer` (default: the checkpoint loaded
    with transformers, or the hf engine's own model) and selects. Also reports avg@N and pass@N of
    the decoded answers, the mean number of distinct correct answers among the N, and 1 − mean
    pairwise similarity of the rationales, and the share of rationales cut by the token budget
    (`truncated_share`). Writes `results.json` and `samples.jsonl` to `output_dir`.

    Lengths are checked as `evaluate` checks them, with the greedy answer's marker and
    `answer_max_tokens` added after each rationale; a vLLM engine opened here is sized to hold them.
    `device`: where the hf engine or the scorer loaded here runs (default `choose_device()`).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown scaling method(s) {unknown}; choose from {', '.join(METHODS)}")
    resolved = {name: resolve_benchmark(name) for name in benchmarks}
    if answer_decoding not in ("greedy", "sampled"):
        raise ValueError(f"answer_decoding must be greedy or sampled, got {answer_decoding!r}")
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise ValueError(f"every N must be >= 1, got {ns}")
    if temperature <= 0:
        raise ValueError("scaling needs sampled rationales: temperature must be > 0")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1 (unset: each benchmark's own budget), got {max_tokens}")
    console = console or Console(stderr=True)
    problems = {
        name: bench.loader(limit)
        if bench.loader is not None
        else load_benchmark(name, limit=limit, data_dir=benchmarks_dir, source=benchmark_source)
        for name, bench in resolved.items()
    }  # read before the engine starts, and measured
    budgets = {name: max_tokens or bench.max_tokens for name, bench in resolved.items()}
    tokenizer = engine_tokenizer(engine, model_path)
    template = template_for(tokenizer)
    after = 0
    if answer_decoding == "greedy":  # the answer is decoded after prompt + rationale + the answer marker
        after = len(encode(tokenizer, template.answer_prefix)) + answer_max_tokens
    needs = length_needs(tokenizer, template, problems, budgets, after=after)
    engine_kwargs = fit_lengths(engine, model_path, tokenizer, needs, engine_kwargs)
    if engine != "hf" and device is not None:
        scorer_device = choose_device(device)  # --device then places the scorer only
    else:
        engine_kwargs, scorer_device = hf_device_kwargs(engine, engine_kwargs, device), None
    with opened_engine(engine, model_path, dtype, engine_kwargs) as (engine, engine_kind):
        check_engine_lengths(engine, needs)
        template = template_for(engine.tokenizer)
        if scorer is None:
            scorer = getattr(engine, "model", None)
            if not isinstance(scorer, torch.nn.Module):
                scorer = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
                scorer.to(scorer_device or choose_device())
        scorer.eval()
        settings = {
            "methods": list(methods),
            "ns": ns,
            "temperature": temperature,
            "top_p": top_p,
            "answer_decoding": answer_decoding,
            "seed": seed,
        }
        results, out_dir = start_results(
            model_path, engine_kind, dtype, output_dir, scaling=settings, **engine_settings(engine)
        )
        for name in benchmarks:
            bench, records = resolved[name], problems[name]
            start = time.monotonic()
            sampling = Sampling(temperature=temperature, top_p=top_p, max_tokens=budgets[name], seed=seed)
            lines = _scale_benchmark(
                records, bench, engine, scorer, template, sampling, ns, methods,
                answer_decoding, answer_max_tokens, batch_size,
            )  # fmt: skip
            metrics = _aggregate(lines, ns, methods)
            reasons = [reason for line in lines for reason in line["finish_reasons"]]
            metrics["truncated_share"] = reasons.count("length") / max(len(reasons), 1)
            metrics["problems"] = len(records)
            metrics["seconds"] = time.monotonic() - start
            results["benchmarks"][name] = metrics
            if out_dir:
                with (out_dir / "samples.jsonl").open("a") as f:
                    f.writelines(json.dumps({"benchmark": name, **line}) + "\n" for line in lines)
    if out_dir:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    console.print(scaling_table(results))
    return results


def _scale_benchmark(
    records, bench, engine, scorer, template, sampling, ns, methods,
    answer_decoding, answer_max_tokens, batch_size,
) -> list[dict[str, Any]]:  # fmt: skip
    n_max = max(ns)
    tokenizer = engine.tokenizer
    marker = encode(tokenizer, template.answer_prefix)
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    lines: list[dict[str, Any]] = []
    for batch, prompts, groups in sample_batches(engine, template, records, sampling, n_max, batch_size):
        rationales = [[rationale_ids(r.completion_ids, marker, stops) for r in g] for g in groups]
        if answer_decoding == "greedy":
            queries = [p + z + marker for p, zs in zip(prompts, rationales) for z in zs]
            greedy = Sampling(temperature=0.0, max_tokens=answer_max_tokens, seed=None)
            decoded = [g[0].text for g in engine.generate(queries, greedy, n=1)]
            texts = [template.answer_prefix + d for d in decoded]
        else:
            texts = [r.text for g in groups for r in g]
        answers = [template.split_completion(t)[1] for t in texts]
        answers = [a if a else None for a in answers]
        for i, (record, prompt, group) in enumerate(zip(batch, prompts, groups)):
            zs = rationales[i]
            mine = answers[i * n_max : (i + 1) * n_max]
            keys = [None if a is None else answer_key(a) for a in mine]
            lines.append(
                _score_problem(
                    record, bench, scorer, tokenizer, template, prompt, group, zs, mine, keys, ns, methods
                )
            )
    return lines


def _score_problem(record, bench, scorer, tokenizer, template, prompt, group, zs, answers, keys, ns, methods):
    candidates: list[str] = []  # distinct keys in order of appearance
    representative: dict[str, str] = {}
    for a, key in zip(answers, keys):
        if key is not None and key not in representative:
            representative[key] = a
            candidates.append(key)
    graded = {
        key: bool(bench.grade(template.completion("", representative[key]), record)) for key in candidates
    }
    correct = [key is not None and graded[key] for key in keys]
    matrix = torch.full((len(zs), len(candidates)), -float("inf"))
    if "bin" in methods and candidates:
        pairs = [(z, representative[key]) for z in zs for key in candidates]
        matrix = torch.tensor(answer_loglik(scorer, tokenizer, template, prompt, pairs)).view(
            len(zs), len(candidates)
        )
        own = [
            matrix[i, candidates.index(key)].item() if key is not None else -float("inf")
            for i, key in enumerate(keys)
        ]
    elif "bon" in methods:
        index = [i for i, key in enumerate(keys) if key is not None]
        scores = answer_loglik(scorer, tokenizer, template, prompt, [(zs[i], answers[i]) for i in index])
        own = [-float("inf")] * len(zs)
        for i, s in zip(index, scores):
            own[i] = s
    else:
        own = [-float("inf")] * len(zs)
    line: dict[str, Any] = {
        "id": record.get("id"),
        "question": record["question"],
        "gold": record["answer"],
        "rationales": [r.text for r in group],
        "finish_reasons": [r.finish_reason for r in group],  # "length": cut by the token budget
        "answers": answers,
        "correct": correct,
        "own_scores": own,
        "candidates": candidates,
        "matrix": matrix.tolist(),
        "picked": {},
    }
    for n in ns:
        sub_keys = keys[:n]
        in_sub = [j for j, key in enumerate(candidates) if key in set(sub_keys)]
        picks: dict[str, bool] = {}
        if "majority" in methods:
            i = select_majority(sub_keys)
            picks["majority"] = i is not None and correct[i]
        if "bon" in methods:
            i = select_bon(own[:n], sub_keys)
            picks["bon"] = i is not None and correct[i]
        if "bin" in methods:
            j = select_bin(matrix[:n, in_sub]) if in_sub else None
            picks["bin"] = j is not None and graded[candidates[in_sub[j]]]
        line["picked"][str(n)] = picks
        line.setdefault("distinct_correct", {})[str(n)] = distinct_correct(answers[:n], correct[:n])
        line.setdefault("diversity", {})[str(n)] = pairwise_diversity([r.text for r in group[:n]])
    return line


def _aggregate(lines: list[dict[str, Any]], ns: Sequence[int], methods: Sequence[str]) -> dict[str, float]:
    count = max(len(lines), 1)
    metrics: dict[str, float] = {}
    for n in ns:
        for method in methods:
            metrics[f"{method}@{n}"] = sum(line["picked"][str(n)][method] for line in lines) / count
        metrics[f"avg@{n}"] = sum(sum(line["correct"][:n]) / n for line in lines) / count
        metrics[f"pass@{n}"] = sum(any(line["correct"][:n]) for line in lines) / count
        metrics[f"distinct_correct@{n}"] = sum(line["distinct_correct"][str(n)] for line in lines) / count
        metrics[f"diversity@{n}"] = sum(line["diversity"][str(n)] for line in lines) / count
    return metrics


def scaling_table(results: dict[str, Any]) -> Table:
    """One row per benchmark and N: accuracy of each method, avg@N, pass@N, distinct correct answers."""
    methods = results["scaling"]["methods"]
    table = Table(title=f"inference scaling: {results['model']}  ({results['engine']})")
    for column in ["benchmark", "N", *methods, "avg", "pass", "distinct correct", "diversity"]:
        table.add_column(column, justify="left" if column == "benchmark" else "right")
    for name, metrics in results["benchmarks"].items():
        for n in results["scaling"]["ns"]:
            row = [name, str(n)] + [f"{100 * metrics[f'{m}@{n}']:.1f}" for m in methods]
            row += [f"{100 * metrics[f'avg@{n}']:.1f}", f"{100 * metrics[f'pass@{n}']:.1f}"]
            row += [f"{metrics[f'distinct_correct@{n}']:.2f}", f"{metrics[f'diversity@{n}']:.3f}"]
            table.add_row(*row)
    return table
