"""Inference in latent thought models (Kong et al., 2025; docs/methods/latent_thought.md).

The decoder (`reasoning.models.latent_thought`) reads latent thought vectors z but does not infer
them: `fit_posterior` fits q(z|x) = N(μ, diag σ²) to each sequence by a short AdamW loop on the
per-sequence NELBO (the fast loop of dual-rate training), `elbo_perplexity` turns that into upper
bounds on perplexity, and `generate_with_inference` decodes from z fitted to a prompt (pass@k over
z). `record_text` / `document_texts` / `tokenize_texts` write records in the model's plain text
format. The mathematics is in `objectives/latent.py`; the trainer (`trainers/latent_thought.py`)
and the evaluation (`eval/latent_thought.py`) both use this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from datasets import Dataset
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedTokenizerBase

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


@dataclass
class LatentInferenceConfig:
    """The fast (inference) loop and the inference-time settings; the trainer's `latent_thought:`
    recipe section (`DualRateConfig`) extends these with its training fields."""

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

    def __post_init__(self) -> None:
        if self.fast_steps < 1:
            raise ValueError(f"fast_steps must be at least 1, got {self.fast_steps}")
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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def latent_shape(model: torch.nn.Module) -> tuple[int, ...]:
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
    model = unwrap(model)
    shape = (input_ids.shape[0], *latent_shape(model))
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
    config: LatentInferenceConfig | None = None,
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
    config = config or LatentInferenceConfig()
    kwargs = config.fit_kwargs(inference=True)
    if steps is not None:
        kwargs["steps"] = steps
    model = unwrap(model)
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
        noise = torch.randn((ids.shape[0], *latent_shape(model)), generator=generator, device=device)
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
    config: LatentInferenceConfig | None = None,
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
    config = config or LatentInferenceConfig()
    k = num_inits if num_inits is not None else config.num_inits
    kwargs = config.fit_kwargs(inference=True)
    kwargs["init_scale"] = config.inference_init_scale
    if steps is not None:
        kwargs["steps"] = steps
    model = unwrap(model)
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
