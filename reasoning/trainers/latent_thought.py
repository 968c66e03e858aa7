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

The fast loop itself (`fit_posterior`) and the other inference helpers (`elbo_perplexity`,
`generate_with_inference`) live next to the model, in `reasoning/models/latent_inference.py`; the
mathematics is in `objectives/latent.py`; few-shot evaluation is in `reasoning/eval/latent_thought.py`.

Recipes (`trainer: latent_thought`): `make_latent_thought_trainer` turns records into training text
(`document_texts`: `Q:{question}\\nT:{solution}\\nA:{answer}`, `examples_per_text` per sequence, EOS
appended) and, with `heldout:`, adds `LatentEvaluationCallback`, which writes the held-out ELBO bound
and few-shot accuracy to `<output_dir>/latent_eval.json` when training ends.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from reasoning.data.datasets import load_records
from reasoning.eval.latent_thought import evaluate_latent_thought
from reasoning.models.latent_inference import (
    LatentInferenceConfig,
    document_texts,
    fit_posterior,
    latent_shape,
    pad_right,
    scored_token_mask,
    tokenize_texts,
)
from reasoning.objectives.latent import gaussian_kl_standard_normal, reconstruction_nll, reparameterize
from reasoning.objectives.logprobs import token_logprobs_from_logits
from reasoning.trainers.base import MetricsRecorder
from reasoning.trainers.checkpoint import ResumableTrainer
from reasoning.trainers.nonfinite import NonFiniteLossGuard, max_nonfinite_losses_field


@dataclass
class DualRateConfig(LatentInferenceConfig):
    """The `latent_thought:` section of a recipe: the fast (inference) loop and inference-time settings
    (`LatentInferenceConfig`), and how records become training text and are evaluated."""

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
    max_nonfinite_losses: int = max_nonfinite_losses_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.examples_per_text < 1:
            raise ValueError(f"examples_per_text must be at least 1, got {self.examples_per_text}")
        if self.shots < 0:
            raise ValueError(f"shots must be non-negative, got {self.shots}")


# ------------------------------------------------------------------------------------ data


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


class LatentThoughtTrainer(MetricsRecorder, NonFiniteLossGuard, ResumableTrainer, Trainer):
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
        self.max_nonfinite_losses = self.dual_rate.max_nonfinite_losses  # NonFiniteLossGuard's limit
        self._signature_columns = ["input_ids", "attention_mask", "labels"]
        # Makes the Trainer count the labelled tokens of each optimiser step (num_items_in_batch).
        self.model_accepts_loss_kwargs = True
        latent_shape(self.accelerator.unwrap_model(self.model))

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
            (rows * self.accelerator.num_processes, *latent_shape(decoder)), device=ids.device
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
        self.record("latent/nelbo_start", fit.nelbo_trace[0].sum() / tokens)
        self.record("latent/sigma", torch.exp(0.5 * fit.logvar).mean())
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
        self.record("latent/nll", nll.detach().sum() / tokens)
        self.record("latent/kl", kl.sum() / tokens)
        self.record("latent/nelbo_end", (nll.detach() + self.dual_rate.kl_weight * kl).sum() / tokens)
        if model.training:  # a NaN/inf loss skips the whole optimizer step (NonFiniteLossGuard)
            loss = self.skip_nonfinite_loss(model, loss)
        return (loss, outputs) if return_outputs else loss

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
