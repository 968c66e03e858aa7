"""Teacher-forced scoring: per-token log-probs of given token spans under a model.

Several trainers need log π(tokens | context) for sequences they did not just sample — a trace
under the prior and under the posterior template, a reference answer after a trace. This does
it in padded batches, from the final hidden states chunk by chunk (no full-vocabulary logits for
the whole batch), at temperature 1 unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from reasoning.objectives.logprobs import (
    entropy_from_logits,
    token_logprobs_from_hidden,
    token_logprobs_from_logits,
)


def head_is_partitioned(model: torch.nn.Module) -> bool:
    """Whether `model`'s output head weight is a DeepSpeed ZeRO-3 partition (an empty local shard that
    only the model's own forward gathers)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and hasattr(head.weight, "ds_id")


class FinalStates(NamedTuple):
    """`final_states`' output for the last `keep` positions."""

    states: torch.Tensor  # final hidden states [B, keep, H], or logits [B, keep, V] when `head` is None
    head: torch.nn.Module | None  # the output head to apply to `states`; None: they are logits
    hidden: torch.Tensor  # final hidden states [B, keep, H] (for heads of a trainer's own)


def final_states(
    model: torch.nn.Module,
    unwrapped: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep: int,
) -> FinalStates:
    """The last `keep` positions' final hidden states and the output head, or — when the head's
    weight is a ZeRO-3 partition — their logits.

    Under ZeRO-3 the head weight read outside the forward is an empty shard, so the logits come from
    the forward itself (`logits_to_keep=keep`): DeepSpeed gathers the weight there and reduces its
    gradient, at the cost of `[B, keep, V]` logits. Otherwise the head is applied chunk by chunk by
    `states_token_logprobs` (no full-vocabulary logits). The last layer's output is taken from the
    decoder with a hook rather than `output_hidden_states` (which keeps every layer's states alive,
    e.g. through a no-grad recomputation). `model` is what is called (DDP, a DeepSpeed engine, or the
    module itself), `unwrapped` the transformers model inside it. No KV cache is built.
    """
    partitioned = head_is_partitioned(unwrapped)
    final: dict[str, torch.Tensor] = {}
    decoder = unwrapped.get_decoder() if hasattr(unwrapped, "get_decoder") else None
    hook = None
    if isinstance(decoder, torch.nn.Module) and decoder is not unwrapped:
        hook = decoder.register_forward_hook(lambda _module, _args, output: final.update(hidden=output[0]))
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_to_keep=keep if partitioned else 1,
            use_cache=False,
            output_hidden_states=hook is None,
        )
    finally:
        if hook is not None:
            hook.remove()
    last = final["hidden"] if hook is not None else out.hidden_states[-1]
    hidden = last[:, last.shape[1] - keep :]
    if partitioned:
        return FinalStates(out.logits, None, hidden)
    return FinalStates(hidden, unwrapped.get_output_embeddings(), hidden)


def states_token_logprobs(
    states: torch.Tensor,
    head: torch.nn.Module | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(ℓ/τ)[target] (and the entropy) `[B, T]` from `final_states`' output sliced to the
    positions predicting `targets` `[B, T]`: hidden states through `head` chunk by chunk, or logits."""
    if head is None:
        entropy = entropy_from_logits(states, temperature) if with_entropy else None
        return token_logprobs_from_logits(states, targets, temperature), entropy
    return token_logprobs_from_hidden(
        states,
        head.weight,
        targets,
        bias=getattr(head, "bias", None),
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )


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
        states, head, _ = final_states(model, model, ids, mask, keep=width)
        # position t's state predicts token t + 1
        logps, _ = states_token_logprobs(states[:, :-1], head, ids[:, 1:], temperature=temperature)
        for row, i in enumerate(chunk):
            out[i] = logps[row, span_starts[i] - 1 : len(sequences[i]) - 1].float().cpu()
    return out  # type: ignore[return-value]
