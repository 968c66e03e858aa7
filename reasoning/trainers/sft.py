"""Supervised fine-tuning on (question, trace, answer) records: the warm-up and the baselines.

The loss is the negative log-likelihood of the completion tokens (trace, answer, EOS) given
the prompt. With `dr_sft=True` it is the "Dr. SFT" loss of the variational-reasoning paper:
Σ_tokens NLL / C with one global constant C (the mean completion length of the data), the same
for every micro-batch, accumulation step and rank, instead of the per-batch token count.
Samples may carry a `weight` column (weighted SFT): each sample's token losses are multiplied
by its weight.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from reasoning.data.templates import Template, template_for
from reasoning.objectives.logprobs import token_logprobs_from_logits
from reasoning.trainers.checkpoint import ResumableTrainer
from reasoning.trainers.nonfinite import NonFiniteLossGuard, max_nonfinite_losses_field


@dataclass
class SFTConfig:
    """The `sft:` section of a recipe."""

    max_length: int = field(default=512, metadata={"help": "Drop samples longer than this many tokens."})
    dr_sft: bool = field(
        default=False,
        metadata={
            "help": "Dr. SFT: divide the token-loss sum by one global constant (mean completion length)."
        },
    )
    loss_constant: float | None = field(
        default=None, metadata={"help": "Dr. SFT constant; default: the mean completion length of the data."}
    )
    posterior: bool = field(
        default=False, metadata={"help": "Train the posterior q(z|x,y'): prompts carry the answer hint."}
    )
    hint_after: bool = field(
        default=False, metadata={"help": "Posterior order: answer first, then the explaining trace."}
    )
    hint_column: str = field(default="answer", metadata={"help": "Column used as the posterior's hint."})
    both_templates: bool = field(
        default=False,
        metadata={
            "help": "Every record gives two samples, one with the prior prompt and one with the hinted "
            "posterior prompt: a warm-up for methods that sample from both (CoVRL) that keeps all the data "
            "for each template (posterior_fraction splits it instead)."
        },
    )
    posterior_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Share of samples given the hinted posterior prompt instead of the prior one (chosen by a "
            "hash of the question), so one network learns both templates: the warm-up CoVRL assumes."
        },
    )

    max_nonfinite_losses: int = max_nonfinite_losses_field()

    def __post_init__(self) -> None:
        if not 0.0 <= self.posterior_fraction <= 1.0:
            raise ValueError(f"sft.posterior_fraction must be in [0, 1], got {self.posterior_fraction}")


def _hinted(question: str, fraction: float) -> bool:
    """A deterministic per-question coin with P(True) = fraction (the same on every run and rank)."""
    return zlib.crc32(question.encode()) / 2**32 < fraction


def tokenize_sft(
    records: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    config: SFTConfig,
    template: Template | None = None,
) -> Dataset:
    """Prompt + completion ids with prompt labels masked (-100); keeps a `weight` column if present."""
    template = template or template_for(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode_batch(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
        fraction = 1.0 if config.posterior else config.posterior_fraction
        # the hint column is read only when some prompts carry a hint (prior-only data need not have it)
        hinted = bool(fraction) or config.both_templates
        hints = rows[config.hint_column] if hinted else [None] * len(rows["question"])
        weights = [float(w) for w in rows.get("weight", [1.0] * len(rows["question"]))]
        samples = []  # (prompt, completion, weight)
        for q, h, z, y, w in zip(rows["question"], hints, rows["solution"], rows["answer"], weights):
            posterior = template.posterior_prompt(q, h, tokenizer, hint_after=config.hint_after) if hinted else None
            if config.both_templates:
                prompts_of_row = [template.prior_prompt(q, tokenizer), posterior]
            else:
                prompts_of_row = [posterior if _hinted(q, fraction) else template.prior_prompt(q, tokenizer)]
            samples += [(p, template.completion(z, y), w) for p in prompts_of_row]
        prompts, completions, weights = (list(column) for column in zip(*samples)) if samples else ([], [], [])
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        completion_ids = [c + eos for c in tokenizer(completions, add_special_tokens=False)["input_ids"]]
        return {
            "input_ids": [p + c for p, c in zip(prompt_ids, completion_ids)],
            "labels": [[-100] * len(p) + c for p, c in zip(prompt_ids, completion_ids)],
            "weight": weights,
        }

    # every input column goes (the output has its own `weight`): a row may become two samples
    tokenized = records.map(encode_batch, batched=True, remove_columns=records.column_names)
    return tokenized.filter(lambda row: len(row["input_ids"]) <= config.max_length)


def mean_completion_length(tokenized: Dataset) -> float:
    """Mean number of supervised tokens per sample: the Dr. SFT constant."""
    counts = [sum(1 for t in labels if t != -100) for labels in tokenized["labels"]]
    return sum(counts) / max(len(counts), 1)


class SFTCollator:
    """Right-pads input ids (pad id), labels (-100) and builds the attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        weights = torch.tensor([float(r.get("weight", 1.0)) for r in rows])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "weight": weights}


class SFTTrainer(NonFiniteLossGuard, ResumableTrainer, Trainer):
    """transformers.Trainer with per-sample weights and the optional Dr. SFT normaliser.

    loss = Σ_i w_i Σ_t NLL_{i,t} / N, where N is the number of supervised tokens in the global
    batch (transformers' `num_items_in_batch`, so gradient accumulation is exact) or, with Dr.
    SFT, C × (global number of samples) with C the data's mean completion length.
    """

    # compute_loss normalises by the whole optimizer step's batch itself (see the formula above).
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, sft_config: SFTConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sft_config = sft_config or SFTConfig()
        self.max_nonfinite_losses = self.sft_config.max_nonfinite_losses  # NonFiniteLossGuard's limit
        self._signature_columns = ["input_ids", "labels", "weight"]
        self.loss_constant = self.sft_config.loss_constant
        if self.sft_config.dr_sft and self.loss_constant is None:
            self.loss_constant = mean_completion_length(self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop("weight", None)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        targets = labels[:, 1:]
        mask = targets != -100
        token_nll = -token_logprobs_from_logits(outputs.logits[:, :-1], targets.clamp(min=0)) * mask
        per_sample = token_nll.sum(dim=1)
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample.dtype)
        if self.loss_constant is not None:
            # DDP averages over ranks, so this rank divides by its own share of the global batch.
            samples_per_rank = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            loss = per_sample.sum() / (self.loss_constant * samples_per_rank)
        elif num_items_in_batch is not None:
            loss = per_sample.sum() / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # num_items_in_batch counts every rank
        else:
            loss = per_sample.sum() / mask.sum().clamp(min=1)
        if model.training:  # a NaN/inf loss skips the whole optimizer step (NonFiniteLossGuard)
            loss = self.skip_nonfinite_loss(model, loss)
        return (loss, outputs) if return_outputs else loss


def make_sft_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Dataset,
    args: Any,
    config: SFTConfig | None = None,
    callbacks: list | None = None,
) -> SFTTrainer:
    """Tokenise `records` and build the trainer (the caller runs `.train()`)."""
    config = config or SFTConfig()
    tokenized = tokenize_sft(records, tokenizer, config)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=tokenized,
        data_collator=SFTCollator(tokenizer.pad_token_id or 0),
        processing_class=tokenizer,
        callbacks=callbacks,
        sft_config=config,
    )
