"""Latent thought models trained by dual-rate variational Bayes (Kong et al., 2025).

For every micro-batch of sequences x:

1. Fast loop (inference): fresh local parameters (μ, log σ²) per sequence, μ = 0 and
   log σ² ≈ −5 at the start, one ε ~ N(0, I) for the whole loop; T_fast AdamW steps on the
   per-sequence NELBO(x) = −log p_β(x | μ + σε) + KL(N(μ, σ²) ‖ N(0, I)) with the reference code's
   cosine-decayed step size (`cosine_step_size`: fast_lr at the first step, fast_lr_min one step
   after the last). Gradients are taken with `torch.autograd.grad` with respect to (μ, log σ²) only: the
   decoder's `.grad` is neither written nor accumulated, no parameter hook fires, so under data
   parallel the loop triggers no gradient all-reduce (it also runs on the unwrapped module, under
   `no_sync` when the model is wrapped in DDP).
2. Slow step (learning): z = μ + σε with μ, σ detached; the Trainer loss is the mean token
   cross-entropy of p_β(x|z), normalised by the tokens of the whole optimiser step, so gradient
   accumulation and data parallel are exact. The decoder's optimiser, schedule and clipping are
   the `TrainingArguments` ones (the paper: AdamW lr 4e-4, betas (0.9, 0.95), wd 0.1, clip 1.0).

Inference helpers: `fit_posterior` (the fast loop on any batch), `elbo_perplexity` (upper bounds on
perplexity: exp(Σ NELBO / Σ tokens), and the reference code's mean over sequences of
exp(NELBO(x) / N_x)), `generate_with_inference` (fit q(z|prompt) from several
random initialisations and decode each: pass@k over z). The mathematics is in `objectives/latent.py`;
few-shot evaluation is in `reasoning/eval/latent_thought.py`.

Recipes (`trainer: latent_thought`): `make_latent_thought_trainer` turns records into training text
(`document_texts`: `Q:{question}\\nT:{solution}\\nA:{answer}`, `examples_per_text` per sequence, EOS
appended) and, with `heldout:`, adds `LatentEvaluationCallback`, which writes the held-out ELBO bound
and few-shot accuracy to `<output_dir>/latent_eval.json` when training ends.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from datasets import Dataset
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from reasoning.data.templates import PlainTemplate
from reasoning.objectives.latent import (
    gaussian_kl_standard_normal,
    nelbo,
    perplexity_sequence_mean,
    perplexity_upper_bound,
    reconstruction_nll,
    reparameterize,
)
from reasoning.objectives.logprobs import token_logprobs_from_logits
from reasoning.trainers.base import reduce_metrics
from reasoning.trainers.checkpoint import ResumableTrainer
from reasoning.trainers.nonfinite import NonFiniteLossGuard


@dataclass
class DualRateConfig:
    """The `latent_thought:` section of a recipe: the fast (inference) loop and inference-time settings."""

    fast_steps: int = field(
        default=16, metadata={"help": "T_fast: AdamW steps on the per-sequence (μ, log σ²) per micro-batch."}
    )
    fast_lr: float = field(default=0.3, metadata={"help": "Fast-loop step size at its first step."})
    fast_lr_min: float = field(
        default=0.03,
        metadata={
            "help": "Floor of the fast loop's cosine decay from fast_lr, reached one step after the last "
            "(the reference code's schedule, lr/10 there)."
        },
    )
    fast_beta1: float = field(default=0.9, metadata={"help": "Fast-loop AdamW β₁."})
    fast_beta2: float = field(default=0.999, metadata={"help": "Fast-loop AdamW β₂."})
    fast_weight_decay: float = field(
        default=0.0, metadata={"help": "Fast-loop AdamW decoupled weight decay on (μ, log σ²)."}
    )
    init_scale: float = field(
        default=0.0,
        metadata={"help": "Training: μ starts at init_scale · N(0, I) (0: μ = 0, the prior mean)."},
    )
    init_logvar: float = field(default=-5.0, metadata={"help": "log σ² starts near this value."})
    init_logvar_noise: float = field(
        default=0.1, metadata={"help": "Std of the Gaussian jitter added to the initial log σ²."}
    )
    kl_weight: float = field(
        default=1.0, metadata={"help": "Weight of KL(q ‖ N(0, I)) in the fast loop (1: the ELBO)."}
    )
    inference_steps: int | None = field(
        default=None, metadata={"help": "Fast-loop steps at evaluation and generation (default: fast_steps)."}
    )
    num_inits: int = field(
        default=4, metadata={"help": "Generation: random initialisations of q(z|prompt), one decode each."}
    )
    inference_init_scale: float = field(
        default=1.0, metadata={"help": "Generation: μ starts at a draw of inference_init_scale · N(0, I)."}
    )
    sample_latents: bool = field(
        default=True, metadata={"help": "Generation decodes with z ~ q(z|prompt); False: with z = μ."}
    )
    examples_per_text: int = field(
        default=1,
        metadata={
            "help": "Training text: this many records (Q:…\\nT:…\\nA:…) joined by newlines per sequence, "
            "so that k-shot prompts with k < examples_per_text look like training text."
        },
    )
    max_length: int = field(default=512, metadata={"help": "Drop training sequences longer than this."})
    heldout: str | None = field(
        default=None,
        metadata={
            "help": "After training: held-out records (any data.train source) for the ELBO perplexity bound "
            "and few-shot accuracy, written to <output_dir>/latent_eval.json."
        },
    )
    heldout_questions: int = field(default=50, metadata={"help": "Held-out records used after training."})
    shots: int = field(
        default=2, metadata={"help": "Solved training examples before the question in a few-shot prompt."}
    )
    answer_max_tokens: int = field(default=48, metadata={"help": "Tokens decoded per few-shot answer."})
    max_nonfinite_losses: int = field(
        default=3,
        metadata={
            "help": "An optimizer step in which any micro-batch's loss is NaN/inf is skipped whole (metric "
            "train/nonfinite_loss_skipped); training stops with an error after more than this many in a row."
        },
    )

    def __post_init__(self) -> None:
        if self.fast_steps < 1:
            raise ValueError(f"fast_steps must be at least 1, got {self.fast_steps}")
        if self.examples_per_text < 1:
            raise ValueError(f"examples_per_text must be at least 1, got {self.examples_per_text}")
        if self.shots < 0:
            raise ValueError(f"shots must be non-negative, got {self.shots}")
        if not 0 < self.fast_lr_min <= self.fast_lr:
            raise ValueError(f"need 0 < fast_lr_min <= fast_lr, got {self.fast_lr_min} and {self.fast_lr}")
        if self.num_inits < 1:
            raise ValueError(f"num_inits must be at least 1, got {self.num_inits}")

    def fit_kwargs(self, inference: bool = False) -> dict[str, Any]:
        """Keyword arguments of `fit_posterior` (with `inference`, its step count is inference_steps)."""
        steps = self.inference_steps if inference and self.inference_steps is not None else self.fast_steps
        return {
            "steps": steps,
            "lr": self.fast_lr,
            "lr_min": self.fast_lr_min,
            "betas": (self.fast_beta1, self.fast_beta2),
            "weight_decay": self.fast_weight_decay,
            "init_scale": self.init_scale,
            "init_logvar": self.init_logvar,
            "init_logvar_noise": self.init_logvar_noise,
            "kl_weight": self.kl_weight,
        }


# ------------------------------------------------------------------------------------ fast loop


def cosine_step_size(step: int, steps: int, lr: float, lr_min: float) -> float:
    """lr_min + ½(lr − lr_min)(1 + cos(π t/T)) at step t of a T-step loop, lr_min from t = T on.

    The schedule of the latent thought models' reference code (`PosteriorOptimizer.get_fast_lr`):
    lr at the first step t = 0, and lr_min is reached one step *after* the last, t = T, so the last
    step still moves with lr_min + ½(lr − lr_min)(1 − cos(π/T)) > lr_min.
    """
    if step >= steps:
        return lr_min
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * step / steps))


def scored_token_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """`[B, T − 1]` mask of the scored targets x_1 … x_{T−1}: the target and its predecessor are tokens
    (not padding, so left- and right-padding both work) and its label, if given, is not −100. The
    first token has no predecessor and is never scored."""
    mask = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    if attention_mask is not None:
        mask = mask & attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    if labels is not None:
        mask = mask & (labels[:, 1:] != -100)
    return mask


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    latents: torch.Tensor,
) -> torch.Tensor:
    """log p_β(x_t | x_<t, z) for t = 1 … T − 1, `[B, T − 1]`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, latents=latents).logits
    return token_logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])


class PosteriorFit(NamedTuple):
    """The fitted q(z|x) = N(μ, diag σ²) and the NELBO per sequence along the fast loop."""

    mu: torch.Tensor  # [B, L, n, d]
    logvar: torch.Tensor  # [B, L, n, d]
    nelbo_trace: torch.Tensor  # [steps (+1 with final_eval), B]: NELBO before each step (and after the last)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _latent_shape(model: torch.nn.Module) -> tuple[int, ...]:
    shape = getattr(getattr(model, "config", None), "latent_shape", None)
    if shape is None:
        raise TypeError(f"{type(model).__name__} has no latent thought vectors (config.latent_shape)")
    return tuple(shape)


def fit_posterior(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    steps: int = 16,
    *,
    labels: torch.Tensor | None = None,
    lr: float = 0.3,
    lr_min: float = 0.03,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    init_scale: float = 0.0,
    init_logvar: float = -5.0,
    init_logvar_noise: float = 0.1,
    kl_weight: float = 1.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    final_eval: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> PosteriorFit:
    """The fast loop: fit q(z|x) = N(μ, diag σ²) to each sequence of `input_ids [B, T]` by AdamW.

    μ₀ = init_scale · N(0, I), log σ²₀ = init_logvar + init_logvar_noise · N(0, I), ε = `noise` (or
    one draw) held fixed; step t minimises Σ_x NELBO(x; μ, log σ², ε) (sequences are independent,
    and Adam's update is per coordinate, so each sequence follows its own NELBO) with step size
    `cosine_step_size(t, steps, lr, lr_min)`. Gradients come from `torch.autograd.grad` with
    respect to (μ, log σ²) alone: the decoder's parameters and their `.grad` are left exactly as they
    were. Runs with gradients enabled even inside `torch.no_grad()`; the model's train/eval mode
    is not changed. Returns detached μ, log σ² (float32) and the NELBO trace; with `final_eval` the
    trace ends with the NELBO after the last step (one more forward pass). `shard = (rank, world)`:
    the random initialisations are drawn for a batch of world × B sequences and rows rank·B … are
    kept, so under data parallelism (generators seeded alike) a sequence gets the draws one process
    with the whole batch would give it.
    """
    model = _unwrap(model)
    shape = (input_ids.shape[0], *_latent_shape(model))
    device = input_ids.device
    rank, world = shard

    def draw() -> torch.Tensor:
        full = torch.randn(
            (shape[0] * world, *shape[1:]), generator=generator, device=device, dtype=torch.float32
        )
        return full[rank * shape[0] : (rank + 1) * shape[0]]

    mu = (init_scale * draw() if init_scale else torch.zeros(shape, device=device)).requires_grad_()
    logvar = (init_logvar + init_logvar_noise * draw()).requires_grad_()
    noise = draw() if noise is None else noise.to(device=device, dtype=torch.float32)
    mask = scored_token_mask(input_ids, attention_mask, labels)
    optimizer = torch.optim.AdamW([mu, logvar], lr=lr, betas=betas, weight_decay=weight_decay)
    trace = []
    with torch.enable_grad():
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_step_size(step, steps, lr, lr_min)
            latents = reparameterize(mu, logvar, noise)
            logp = sequence_logprobs(model, input_ids, attention_mask, latents)
            per_sequence = nelbo(logp, mask, mu, logvar, kl_weight)
            mu.grad, logvar.grad = torch.autograd.grad(per_sequence.sum(), [mu, logvar])
            optimizer.step()
            trace.append(per_sequence.detach().float())
    mu, logvar = mu.detach(), logvar.detach()
    if final_eval:
        with torch.no_grad():
            logp = sequence_logprobs(model, input_ids, attention_mask, reparameterize(mu, logvar, noise))
            trace.append(nelbo(logp, mask, mu, logvar, kl_weight).float())
    return PosteriorFit(mu, logvar, torch.stack(trace) if trace else torch.zeros(0, shape[0], device=device))


# ------------------------------------------------------------------------------------ inference


@dataclass
class ElboPerplexity:
    """ELBO evaluation of a corpus, perplexity in two conventions (neither is the perplexity itself):

    - `perplexity_upper_bound` = exp(Σ_x NELBO(x) / Σ_x N_x) = exp(nelbo_per_token), the corpus
      convention: it bounds exp(−Σ log p(x) / Σ N) from above (in expectation over ε);
    - `perplexity_sequence_mean` = mean_x exp(NELBO(x) / N_x), the latent thought models' reference
      code (`elbo` in eval mode: exp(NELBO_b / length) per sequence, averaged over the batch, then
      over batches): each term bounds that sequence's own perplexity; the mean weighs every sequence
      alike and, by convexity, is at least exp(mean_x NELBO(x)/N_x) (the corpus figure when every
      N_x is the same, as in the reference's fixed-length chunks), so the two are not
      interchangeable in a table.
    """

    perplexity_upper_bound: float
    nelbo_per_token: float
    nll_per_token: float
    kl_per_token: float
    num_tokens: int
    num_sequences: int
    perplexity_sequence_mean: float = float("nan")


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids [N, T]` and `attention_mask [N, T]` from lists of ids."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def elbo_perplexity(
    model: torch.nn.Module,
    data: torch.Tensor | Dataset | Iterable[Sequence[int] | dict[str, Any]],
    attention_mask: torch.Tensor | None = None,
    *,
    config: DualRateConfig | None = None,
    steps: int | None = None,
    batch_size: int = 16,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> ElboPerplexity:
    """Upper bounds on perplexity from the ELBO: fit q(z|x) to every sequence, then
    exp(Σ_x NELBO(x) / Σ_x N_x) ≥ exp(−Σ_x log p_β(x) / Σ_x N_x) (in expectation over ε), and the
    reference code's convention mean_x exp(NELBO(x) / N_x) (`ElboPerplexity`).

    `data` is `input_ids [N, T]` (with `attention_mask`), a `datasets.Dataset` with an `input_ids`
    column, or an iterable of id lists or of rows with `input_ids`. N_x counts the scored tokens
    x_1 … x_{T−1} (`scored_token_mask`). The fast loop uses `config` (inference_steps, μ₀ = 0 as in
    training unless `config.init_scale` says otherwise); `steps` overrides its length.
    """
    config = config or DualRateConfig()
    kwargs = config.fit_kwargs(inference=True)
    if steps is not None:
        kwargs["steps"] = steps
    model = _unwrap(model)
    device = next(model.parameters()).device
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None) or 0
    if isinstance(data, torch.Tensor):
        mask = attention_mask if attention_mask is not None else torch.ones_like(data)
        batches = [
            (data[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, len(data), batch_size)
        ]
    else:
        rows = [r["input_ids"] if isinstance(r, dict) else r for r in data]
        batches = [pad_right(rows[i : i + batch_size], pad_token_id) for i in range(0, len(rows), batch_size)]
    totals = {"nll": 0.0, "kl": 0.0, "tokens": 0, "sequences": 0}
    per_sequence: list[torch.Tensor] = []  # NELBO(x) / N_x
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        noise = torch.randn((ids.shape[0], *_latent_shape(model)), generator=generator, device=device)
        fit = fit_posterior(model, ids, mask, noise=noise, generator=generator, final_eval=False, **kwargs)
        with torch.no_grad():
            logp = sequence_logprobs(model, ids, mask, reparameterize(fit.mu, fit.logvar, noise))
            scored = scored_token_mask(ids, mask)
            nll = reconstruction_nll(logp, scored).double()
            kl = gaussian_kl_standard_normal(fit.mu, fit.logvar).double()
            per_sequence.append((nll + kl) / scored.sum(-1).clamp(min=1))
            totals["nll"] += float(nll.sum())
            totals["kl"] += float(kl.sum())
            totals["tokens"] += int(scored.sum())
            totals["sequences"] += ids.shape[0]
    tokens = max(totals["tokens"], 1)
    total_nelbo = totals["nll"] + totals["kl"]
    return ElboPerplexity(
        perplexity_upper_bound=perplexity_upper_bound(total_nelbo, tokens),
        nelbo_per_token=total_nelbo / tokens,
        nll_per_token=totals["nll"] / tokens,
        kl_per_token=totals["kl"] / tokens,
        num_tokens=totals["tokens"],
        num_sequences=totals["sequences"],
        perplexity_sequence_mean=perplexity_sequence_mean(torch.cat(per_sequence)) if per_sequence else 1.0,
    )


class InferenceGeneration(NamedTuple):
    """Decodes of `generate_with_inference`, grouped by prompt: K = num_inits per prompt."""

    sequences: torch.Tensor  # [B, K, S]: prompt (as given, left-padded) + continuation, pad after EOS
    latents: torch.Tensor  # [B, K, L, n, d]: the z each sequence was decoded with
    nelbo: torch.Tensor  # [B, K]: the prompt's NELBO under each fitted q(z|prompt)


def generate_with_inference(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_inits: int | None = None,
    steps: int | None = None,
    config: DualRateConfig | None = None,
    generator: torch.Generator | None = None,
    **generate_kwargs: Any,
) -> InferenceGeneration:
    """Conditional generation by posterior inference: for each prompt, fit q(z|prompt) from `num_inits`
    random initialisations (μ₀ = inference_init_scale · N(0, I), independent ε), take z ~ q (or z = μ
    with `sample_latents=False`), and decode each with `model.generate(..., latents=z)`.

    `prompt_ids [B, T]` should be left-padded (with `attention_mask`) so that every continuation
    starts right after its prompt. The K decodes of one prompt are candidates for pass@k over z;
    their NELBOs rank how well each z explains the prompt. `generate_kwargs` go to `generate`
    (e.g. `max_new_tokens`, `do_sample`).
    """
    config = config or DualRateConfig()
    k = num_inits if num_inits is not None else config.num_inits
    kwargs = config.fit_kwargs(inference=True)
    kwargs["init_scale"] = config.inference_init_scale
    if steps is not None:
        kwargs["steps"] = steps
    model = _unwrap(model)
    batch = prompt_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(prompt_ids)
    ids = prompt_ids.repeat_interleave(k, dim=0)
    mask = attention_mask.repeat_interleave(k, dim=0)
    fit = fit_posterior(model, ids, mask, generator=generator, final_eval=True, **kwargs)
    latents = fit.mu
    if config.sample_latents:
        noise = torch.randn(fit.mu.shape, generator=generator, device=fit.mu.device)
        latents = reparameterize(fit.mu, fit.logvar, noise)
    with torch.no_grad():
        sequences = model.generate(input_ids=ids, attention_mask=mask, latents=latents, **generate_kwargs)
    return InferenceGeneration(
        sequences=sequences.view(batch, k, -1),
        latents=latents.view(batch, k, *latents.shape[1:]),
        nelbo=fit.nelbo_trace[-1].view(batch, k),
    )


# ------------------------------------------------------------------------------------ data


def record_text(record: dict[str, Any], template: PlainTemplate | None = None) -> str:
    """One solved example in the plain template: `Q:{question}\\nT:{solution}\\nA:{answer}` (no EOS)."""
    template = template or PlainTemplate()
    return template.prior_prompt(str(record["question"])) + template.completion(
        str(record.get("solution") or ""), str(record["answer"])
    )


def document_texts(
    records: Iterable[dict[str, Any]], examples_per_text: int = 1, template: PlainTemplate | None = None
) -> list[str]:
    """Training text: consecutive groups of `examples_per_text` records, each group one document whose
    examples are joined by a newline (a short last group is kept)."""
    texts = [record_text(r, template) for r in records]
    return ["\n".join(texts[i : i + examples_per_text]) for i in range(0, len(texts), examples_per_text)]


def tokenize_texts(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, max_length: int = 512, add_eos: bool = True
) -> Dataset:
    """A `Dataset` with one `input_ids` row per text (EOS appended), texts longer than `max_length` dropped."""
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    rows = [ids + eos for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return Dataset.from_dict({"input_ids": [r for r in rows if len(r) <= max_length]})


class LatentThoughtCollator:
    """Right-pads `input_ids`, builds `attention_mask` and `labels` (= ids; −100 on padding and on the
    first token, which is never predicted, so every count of labels equals the scored tokens)."""

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = pad_right([r["input_ids"] for r in rows], self.pad_id)
        labels = ids.masked_fill(mask == 0, -100)
        if any("labels" in r for r in rows):
            given, _ = pad_right([r.get("labels", r["input_ids"]) for r in rows], -100)
            labels = given.masked_fill(mask == 0, -100)
        labels[:, 0] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------ trainer


class LatentThoughtTrainer(NonFiniteLossGuard, ResumableTrainer, Trainer):
    """Dual-rate training of a latent-thought decoder (see the module docstring).

    Each micro-batch: `infer_latents` runs the fast loop and puts z = sg(μ + σε) into the inputs;
    `compute_loss` returns Σ_x −log p_β(x|z) / N with N the scored tokens of the whole optimiser
    step across accumulation steps and ranks (transformers' `num_items_in_batch`), which the
    Trainer backpropagates into the decoder only. Evaluation (`eval_loss`) is the NELBO per token
    after the fast loop, whose exp is the perplexity upper bound. Logged: `latent/nelbo_start`,
    `latent/nelbo_end` (NELBO per token before the first and after the last fast step),
    `latent/nll`, `latent/kl` (per token), `latent/sigma` (mean σ).
    """

    # compute_loss normalises by the whole optimiser step's tokens itself.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, dual_rate: DualRateConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dual_rate = dual_rate or DualRateConfig()
        self._signature_columns = ["input_ids", "attention_mask", "labels"]
        # Makes the Trainer count the labelled tokens of each optimiser step (num_items_in_batch).
        self.model_accepts_loss_kwargs = True
        self._metrics: dict[str, list[float]] = defaultdict(list)
        _latent_shape(self.accelerator.unwrap_model(self.model))

    @staticmethod
    def _no_sync(model: torch.nn.Module):
        return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()

    def infer_latents(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The fast loop on this micro-batch: `inputs` plus `latents` (z, detached) and `latent_kl` `[B]`."""
        decoder = self.accelerator.unwrap_model(model)
        ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
        # Every rank draws the noise of the whole global micro-batch (the ranks' generators are seeded
        # alike) and keeps its own rows: rank r's samples get the noise one process would give them,
        # and the ranks do not reuse one another's noise.
        rows, rank = ids.shape[0], self.accelerator.process_index
        noise = torch.randn(
            (rows * self.accelerator.num_processes, *_latent_shape(decoder)), device=ids.device
        )[rank * rows : (rank + 1) * rows]
        with self._no_sync(model), self.compute_loss_context_manager():
            fit = fit_posterior(
                decoder,
                ids,
                mask,
                labels=labels,
                noise=noise,
                final_eval=False,
                shard=(rank, self.accelerator.num_processes),
                **self.dual_rate.fit_kwargs(),
            )
        tokens = scored_token_mask(ids, mask, labels).sum().clamp(min=1)
        self._record("latent/nelbo_start", fit.nelbo_trace[0].sum() / tokens)
        self._record("latent/sigma", torch.exp(0.5 * fit.logvar).mean())
        kl = gaussian_kl_standard_normal(fit.mu, fit.logvar)
        return {**inputs, "latents": reparameterize(fit.mu, fit.logvar, noise).detach(), "latent_kl": kl}

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = self.infer_latents(model, self._prepare_inputs(inputs))
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "latents" not in inputs:
            inputs = self.infer_latents(model, inputs)
        ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
        outputs = model(input_ids=ids, attention_mask=mask, latents=inputs["latents"])
        scored = scored_token_mask(ids, mask, labels)
        nll = reconstruction_nll(token_logprobs_from_logits(outputs.logits[:, :-1], ids[:, 1:]), scored)
        tokens = scored.sum().clamp(min=1)
        if num_items_in_batch is not None:
            loss = nll.sum() / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # num_items_in_batch counts every rank
        else:
            loss = nll.sum() / tokens / getattr(self, "current_gradient_accumulation_steps", 1)
        kl = inputs["latent_kl"]
        self._record("latent/nll", nll.detach().sum() / tokens)
        self._record("latent/kl", kl.sum() / tokens)
        self._record("latent/nelbo_end", (nll.detach() + self.dual_rate.kl_weight * kl).sum() / tokens)
        if model.training:  # a NaN/inf loss skips the whole optimizer step (NonFiniteLossGuard)
            loss = self.skip_nonfinite_loss(model, loss)
        return (loss, outputs) if return_outputs else loss

    @property
    def max_nonfinite_losses(self) -> int:
        """`NonFiniteLossGuard`'s limit of skipped optimizer steps in a row, from the config."""
        return self.dual_rate.max_nonfinite_losses

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation loss: NELBO per scored token after the fast loop (exp of it bounds perplexity)."""
        inputs = self._prepare_inputs(inputs)
        ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
        with self._no_sync(model), self.compute_loss_context_manager():
            fit = fit_posterior(
                self.accelerator.unwrap_model(model),
                ids,
                mask,
                labels=labels,
                **self.dual_rate.fit_kwargs(inference=True),
            )
        tokens = scored_token_mask(ids, mask, labels).sum().clamp(min=1)
        return (fit.nelbo_trace[-1].sum() / tokens).detach(), None, None

    # ------------------------------------------------------------------ metrics and logs
    def _record(self, name: str, value: float | torch.Tensor) -> None:
        self._metrics[name].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        averaged = reduce_metrics(self.accelerator, self._metrics)
        self._metrics.clear()
        super().log({**logs, **averaged}, start_time)


# ------------------------------------------------------------------------------------ recipe


def make_latent_thought_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Dataset | Sequence[dict[str, Any]],
    args: TrainingArguments,
    config: DualRateConfig | None = None,
    callbacks: list | None = None,
) -> LatentThoughtTrainer:
    """The trainer of a `trainer: latent_thought` recipe: text = records in the plain template,
    `config.examples_per_text` per sequence, EOS appended; with `config.heldout`, the model is evaluated
    after training (`LatentEvaluationCallback`). A model without latent vectors is a ValueError."""
    config = config or DualRateConfig()
    if getattr(getattr(model, "config", None), "latent_shape", None) is None:
        raise ValueError(
            f"needs a latent-thought model (model.latent_thought: {{hidden_size: ..}} or a saved "
            f"LatentThoughtForCausalLM checkpoint), got {type(model).__name__}"
        )
    rows = list(records)
    dataset = tokenize_texts(document_texts(rows, config.examples_per_text), tokenizer, config.max_length)
    if len(dataset) == 0:
        raise ValueError(f"no training sequence fits in max_length={config.max_length} tokens")
    callbacks = list(callbacks or [])
    if config.heldout:
        callbacks.append(LatentEvaluationCallback(config, tokenizer, demonstrations=rows[:1000]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return LatentThoughtTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=LatentThoughtCollator(pad_id=pad_id),
        processing_class=tokenizer,
        dual_rate=config,
        callbacks=callbacks,
    )


class LatentEvaluationCallback(TrainerCallback):
    """At the end of training (main process): the held-out ELBO perplexity bound and few-shot accuracy
    of `reasoning.eval.latent_thought.evaluate_latent_thought`, written to `<output_dir>/latent_eval.json`."""

    def __init__(
        self,
        config: DualRateConfig,
        tokenizer: PreTrainedTokenizerBase,
        demonstrations: Sequence[dict[str, Any]],
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.demonstrations = list(demonstrations)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None or not self.config.heldout:
            return
        import json
        from pathlib import Path

        from reasoning.data.datasets import load_records
        from reasoning.eval.latent_thought import evaluate_latent_thought

        heldout = list(load_records(self.config.heldout, limit=self.config.heldout_questions))
        was_training = model.training
        model.eval()
        try:
            results = evaluate_latent_thought(
                model, self.tokenizer, heldout, self.demonstrations, self.config, seed=args.seed
            )
        finally:
            model.train(was_training)
        results["global_step"] = state.global_step
        path = Path(args.output_dir) / "latent_eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
