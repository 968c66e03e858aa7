"""Teacher-forced scoring: per-token log-probs of given token spans under a model.

Several trainers need log π(tokens | context) for sequences they did not just sample — a trace
under the prior and under the posterior template, a reference answer after a trace. This does
it in padded batches, from the final hidden states chunk by chunk (no full-vocabulary logits for
the whole batch), at temperature 1 unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from reasoning.objectives.logprobs import token_logprobs_from_hidden


@torch.no_grad()
def span_token_logprobs(
    model: PreTrainedModel,
    sequences: Sequence[Sequence[int]],
    span_starts: Sequence[int],
    pad_id: int = 0,
    batch_size: int = 32,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """log π(s_t | s_<t) for t in [span_starts[i], len(sequences[i])) of every sequence.

    Returns one float32 tensor per sequence with `len(seq) − span_start` entries (on the CPU).
    A span must start after position 0 (the first token has no context). Sequences are
    right-padded in batches of `batch_size`, longest first to keep padding small.
    """
    for i, (seq, start) in enumerate(zip(sequences, span_starts, strict=True)):
        if not 1 <= start <= len(seq):
            raise ValueError(f"sequence {i}: span start {start} must be in [1, {len(seq)}]")
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(sequences[i])] = torch.tensor(list(sequences[i]))
            mask[row, : len(sequences[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1
        ).hidden_states[-1]
        # position t's hidden state predicts token t + 1
        logps, _ = token_logprobs_from_hidden(
            hidden[:, :-1],
            head.weight,
            ids[:, 1:],
            bias=getattr(head, "bias", None),
            temperature=temperature,
        )
        for row, i in enumerate(chunk):
            out[i] = logps[row, span_starts[i] - 1 : len(sequences[i]) - 1].float().cpu()
    return out  # type: ignore[return-value]
