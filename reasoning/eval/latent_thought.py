"""Evaluation of latent thought models: ELBO perplexity bound, few-shot accuracy by posterior inference.

- `elbo_perplexity` (in `reasoning.models.latent_inference`) fits q(z|x) to each held-out text and
  reports two upper bounds, never the perplexity itself: `perplexity_upper_bound` = exp(Σ NELBO /
  Σ tokens) (the corpus convention) and `perplexity_sequence_mean` = mean over texts of
  exp(NELBO(x) / N_x) (the convention of the latent thought models' reference code).
- `few_shot_accuracy`: prompt = k solved examples + the question (plain template, examples joined by
  newlines as in the training documents); fit q(z|prompt) from `num_inits` random initialisations,
  decode each greedily, cut the completion at the next example, grade with
  `reasoning.rewards.verifier.is_correct`. Reported: avg@K (mean over the K decodes), pass@k over z
  (unbiased estimator), and the accuracy of the decode whose z explains the prompt best (lowest
  NELBO, a choice made without the answer). With `infer=False`, or for a model without latent
  vectors (an autoregressive baseline), one greedy decode per prompt (z = 0, the prior mean).
- `token_perplexity`: the exact perplexity of an autoregressive model (or of p(x|z = 0)) on the
  same texts, for comparisons, in both conventions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from reasoning.data.templates import PlainTemplate
from reasoning.eval.metrics import pass_at_k
from reasoning.models.latent_inference import (
    LatentInferenceConfig,
    document_texts,
    elbo_perplexity,
    generate_with_inference,
    pad_right,
    record_text,
    scored_token_mask,
    tokenize_texts,
)
from reasoning.objectives.latent import perplexity_sequence_mean, reconstruction_nll
from reasoning.objectives.logprobs import token_logprobs_from_logits
from reasoning.rewards.verifier import is_correct

if TYPE_CHECKING:  # the trainer layer imports this module; a type only
    from reasoning.trainers.latent_thought import DualRateConfig

Record = dict[str, Any]


def has_latents(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "latent_shape", None) is not None


def few_shot_prompt(
    demonstrations: Sequence[Record], question: str, template: PlainTemplate | None = None
) -> str:
    """`Q:{q₁}\\nT:{t₁}\\nA:{a₁}\\n … \\nQ:{question}\\nT:`: the demonstrations, then the question's prompt."""
    template = template or PlainTemplate()
    return "".join(record_text(d, template) + "\n" for d in demonstrations) + template.prior_prompt(question)


def first_example(completion: str, template: PlainTemplate | None = None) -> str:
    """The completion up to the start of the next example (models trained on documents keep going)."""
    template = template or PlainTemplate()
    return completion.split("\n" + template.question_prefix, 1)[0]


def choose_demonstrations(
    pool: Sequence[Record], count: int, shots: int, seed: int = 0
) -> list[list[Record]]:
    """`count` lists of `shots` distinct demonstrations drawn from `pool` (seeded)."""
    if shots and len(pool) < shots:
        raise ValueError(f"need at least {shots} demonstration records, got {len(pool)}")
    rng = random.Random(seed)
    return [rng.sample(list(pool), shots) if shots else [] for _ in range(count)]


def _left_pad(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], device
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.as_tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def decode_prompts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    infer: bool = True,
    config: LatentInferenceConfig | None = None,
    num_inits: int | None = None,
    steps: int | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[list[list[str]], list[list[float]] | None]:
    """Greedy continuations of each prompt: K = num_inits per prompt, each decoded with its own z fitted
    to the prompt (`generate_with_inference`), or one plain greedy decode (z = 0 for a latent model)
    when `infer` is False or the model has no latents. Returns texts [P][K] and prompt NELBOs [P][K]
    (None without inference)."""
    config = config or LatentInferenceConfig()
    infer = infer and has_latents(model)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    texts: list[list[str]] = []
    nelbos: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _left_pad(tokenizer, prompts[start : start + batch_size], device)
        width = ids.shape[1]
        if infer:
            out = generate_with_inference(
                model,
                ids,
                mask,
                num_inits=num_inits,
                steps=steps,
                config=config,
                generator=generator,
                **kwargs,
            )
            sequences = out.sequences[:, :, width:]
            nelbos.extend(out.nelbo.tolist())
        else:
            with torch.no_grad():
                sequences = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, None, width:]
        for row in sequences:
            texts.append([tokenizer.decode(seq, skip_special_tokens=True) for seq in row])
    return texts, (nelbos if infer else None)


def few_shot_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Record],
    demonstrations: Sequence[Record],
    shots: int,
    *,
    infer: bool = True,
    config: LatentInferenceConfig | None = None,
    num_inits: int | None = None,
    steps: int | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
    keep_samples: int = 5,
) -> dict[str, Any]:
    """Few-shot accuracy on `questions` (records with question, answer and, for synthetic tasks, task):
    `shots` demonstrations per prompt drawn from `demonstrations`; see the module docstring."""
    config = config or LatentInferenceConfig()
    start = time.monotonic()
    demos = choose_demonstrations(demonstrations, len(questions), shots, seed)
    prompts = [few_shot_prompt(d, str(q["question"])) for d, q in zip(demos, questions)]
    texts, nelbos = decode_prompts(
        model,
        tokenizer,
        prompts,
        infer=infer,
        config=config,
        num_inits=num_inits,
        steps=steps,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    correct = [[is_correct(first_example(t), q) for t in row] for row, q in zip(texts, questions)]
    k = len(correct[0]) if correct else 0
    n = max(len(correct), 1)
    result: dict[str, Any] = {
        "shots": shots,
        "questions": len(questions),
        "latent_inference": nelbos is not None,
        "num_inits": k,
        "inference_steps": (steps or config.fit_kwargs(inference=True)["steps"]) if nelbos is not None else 0,
        f"avg@{k}": sum(sum(c) / len(c) for c in correct) / n,
    }
    j = 1
    while j <= k:
        result[f"pass@{j}"] = sum(pass_at_k(len(c), sum(c), j) for c in correct) / n
        j *= 2
    if k and f"pass@{k}" not in result:
        result[f"pass@{k}"] = sum(pass_at_k(len(c), sum(c), k) for c in correct) / n
    if nelbos is not None:
        best = [min(range(len(row)), key=row.__getitem__) for row in nelbos]
        result[f"lowest_nelbo@{k}"] = sum(c[b] for c, b in zip(correct, best)) / n
    result["seconds"] = time.monotonic() - start
    result["samples"] = [
        {
            "prompt": p,
            "completions": [first_example(t) for t in row],
            "correct": c,
            "answer": str(q["answer"]),
        }
        for p, row, c, q in list(zip(prompts, texts, correct, questions))[:keep_samples]
    ]
    return result


def token_perplexity(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 16
) -> dict[str, float]:
    """Exact exp(−Σ log p(x_t|x_<t) / N) over the scored tokens of `texts` (EOS appended) for an
    autoregressive model (`perplexity`), and the mean over texts of exp(NLL(x) / N_x)
    (`perplexity_sequence_mean`, the latent thought reference's convention); for a latent model it
    is the perplexity of p(x | z = 0), not of p(x)."""
    rows = tokenize_texts(texts, tokenizer, max_length=10**9)["input_ids"]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll, tokens = 0.0, 0
    per_sequence: list[torch.Tensor] = []  # NLL(x) / N_x
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_right(rows[start : start + batch_size], pad)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            scored = scored_token_mask(ids, mask)
            sequence_nll = reconstruction_nll(token_logprobs_from_logits(logits[:, :-1], ids[:, 1:]), scored)
            per_sequence.append(sequence_nll.double() / scored.sum(-1).clamp(min=1))
            nll += float(sequence_nll.sum())
            tokens += int(scored.sum())
    per_token = nll / max(tokens, 1)
    by_sequence = perplexity_sequence_mean(torch.cat(per_sequence)) if per_sequence else 1.0
    return {
        "perplexity": float(torch.tensor(per_token).exp()),
        "perplexity_sequence_mean": by_sequence,
        "nll_per_token": per_token,
        "num_tokens": tokens,
    }


def evaluate_latent_thought(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    heldout: Sequence[Record],
    demonstrations: Sequence[Record],
    config: DualRateConfig,
    *,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Held-out evaluation of a latent thought model as the recipe runs it after training:
    `elbo` — the perplexity bounds (`perplexity_upper_bound`, exp(Σ NELBO / Σ N); and
    `perplexity_sequence_mean`, the reference code's mean of exp(NELBO(x) / N_x)) on the held-out
    records written as training documents
    (`config.examples_per_text` per text); `few_shot` — `config.shots`-shot accuracy with q(z|prompt)
    fitted from `config.num_inits` initialisations; `few_shot_prior_z` — the same prompts decoded
    with z = 0 (no inference), the baseline that shows what inference adds. `config` is the recipe's
    `latent_thought:` section (`reasoning.trainers.latent_thought.DualRateConfig`)."""
    heldout = list(heldout)
    texts = document_texts(heldout, config.examples_per_text)
    rows = tokenize_texts(texts, tokenizer, max_length=10**9)["input_ids"]
    start = time.monotonic()
    bound = elbo_perplexity(
        model, rows, config=config, batch_size=batch_size, generator=torch.Generator().manual_seed(seed)
    )
    elbo = {**asdict(bound), "inference_steps": config.fit_kwargs(inference=True)["steps"]}
    elbo["seconds"] = time.monotonic() - start
    common = {"max_new_tokens": config.answer_max_tokens, "batch_size": batch_size, "seed": seed}
    return {
        "elbo": elbo,
        "few_shot": few_shot_accuracy(
            model, tokenizer, heldout, demonstrations, config.shots, config=config, **common
        ),
        "few_shot_prior_z": few_shot_accuracy(
            model, tokenizer, heldout, demonstrations, config.shots, infer=False, config=config, **common
        ),
    }
