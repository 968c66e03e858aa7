"""Padding-free packing: a micro-batch's sequences concatenated into one row, positions restarting
at 0 for each sequence, so the forward pass computes no padding at all.

Which attention backends keep packed sequences apart (transformers 5.19, Qwen2 and every model that
builds its mask with `masking_utils.create_causal_mask`): when `attention_mask` is None and
`position_ids` are given, `_preprocess_mask_arguments` finds the sequence boundaries from the
positions (`find_packed_sequence_indices`: a new sequence wherever the position does not grow by 1)
and ANDs a block-diagonal mask into the causal one — for `eager` and `sdpa` (a dense `[1, 1, T, T]`
mask) and `flex_attention` (a block mask). The flash-attention kernels (`flash_attention_2/3/4`,
hub kernels) get no mask; `_flash_attention_forward` derives `cu_seqlens` from the positions
(`_is_packed_sequence`, batch size 1 only) and runs the varlen kernel: no cross-sequence attention
and no quadratic mask. RoPE takes the same per-sequence positions, so each sequence sees exactly
what it sees alone.

Cost: with flash kernels the attention of a packed row is Σ Lᵢ², as unpacked. With `eager`/`sdpa`
it is T² for a row of T tokens (the mask only zeroes the cross-sequence part), so on CPU, where
there is no varlen kernel, length-bucketed padded micro-batches are the cheaper token-exact path
for long rows; `packing_support` says which, and `verify_packing` checks a model on a probe.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from reasoning.models.scoring import Warpers, head_is_partitioned, states_token_logprobs, unwrap

# attention implementations whose masks transformers builds from packed position ids, and the
# flash kernels that read them as varlen boundaries
MASKED_BACKENDS = ("eager", "sdpa", "flex_attention")
VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


class PackedInputs(NamedTuple):
    """One packed row and where to read each completion token's log-prob from.

    `input_ids`, `position_ids`: `[1, T]`, sequence after sequence (prompt then completion), no pad.
    `state_index`: `[b, Tc]`, the packed position whose final state predicts completion token t of
    sequence i (its previous token); 0 where `completion_mask` is 0. `lengths`: the b sequences'
    token counts.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    state_index: torch.Tensor
    completion_mask: torch.Tensor
    lengths: list[int]


def attention_backend(model: torch.nn.Module) -> str:
    """The attention implementation a transformers model runs with (`config._attn_implementation`)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def packing_support(model: torch.nn.Module) -> str | None:
    """None when `model`'s attention backend keeps packed sequences apart, else why not.

    `varlen` backends cost Σ Lᵢ² in attention; masked ones (eager, sdpa, flex) T² per packed row
    — correct, but on long rows dearer than length-bucketed padding (see the module docstring).
    """
    backend = attention_backend(model)
    if backend in MASKED_BACKENDS or backend in VARLEN_BACKENDS or "flash" in backend:
        return None
    return (
        f"attention implementation {backend!r} is not one transformers builds a packed-sequence mask for "
        f"({', '.join(MASKED_BACKENDS + VARLEN_BACKENDS)}); use length-bucketed padded micro-batches instead"
    )


def is_varlen_backend(model: torch.nn.Module) -> bool:
    """Whether packed attention runs as a varlen kernel (Σ Lᵢ², no T×T mask)."""
    backend = attention_backend(model)
    return backend in VARLEN_BACKENDS or "flash" in backend


def packed_inputs(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> PackedInputs:
    """Pack b sequences given in the collated layout (prompts `[b, P]` left-padded, completions
    `[b, Tc]` right-padded, with their 0/1 masks) into one row."""
    if prompt_ids.shape != prompt_mask.shape or completion_ids.shape != completion_mask.shape:
        raise ValueError(
            f"ids and masks must have the same shapes: prompt {tuple(prompt_ids.shape)} vs "
            f"{tuple(prompt_mask.shape)}, completion {tuple(completion_ids.shape)} vs {tuple(completion_mask.shape)}"
        )
    pieces, positions, lengths = [], [], []
    rows, width = completion_ids.shape
    state_index = torch.zeros((rows, width), dtype=torch.long)
    offset = 0
    for i in range(rows):
        prompt = prompt_ids[i][prompt_mask[i].bool()]
        completion = completion_ids[i][completion_mask[i].bool()]
        sequence = torch.cat([prompt, completion])
        if len(sequence) == 0:
            raise ValueError(f"sequence {i} has no tokens (empty prompt and completion masks)")
        if len(prompt) == 0 and len(completion):
            raise ValueError(f"sequence {i} has a completion but no prompt: its first token has no context")
        pieces.append(sequence)
        positions.append(torch.arange(len(sequence)))
        c = len(completion)
        # completion token t sits at offset + len(prompt) + t; the state before it predicts it
        state_index[i, :c] = offset + len(prompt) - 1 + torch.arange(c)
        lengths.append(len(sequence))
        offset += len(sequence)
    return PackedInputs(
        torch.cat(pieces).unsqueeze(0).to(completion_ids.device),
        torch.cat(positions).unsqueeze(0).to(completion_ids.device),
        state_index.to(completion_ids.device),
        completion_mask.bool(),
        lengths,
    )


def packed_states(
    model: torch.nn.Module, packed: PackedInputs, unwrapped: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.nn.Module | None]:
    """Final states `[K, H]` at the K positions predicting a completion token (`state_index` where
    `completion_mask`, row by row) and the output head, or — when the head's weight is a ZeRO-3
    partition — the logits `[K, V]` there (from the forward itself, only at those positions) and
    None. `model` is what is called (DDP, DeepSpeed or the module), `unwrapped` the transformers
    model inside (None: `unwrap(model)`). No attention mask: the positions delimit the sequences."""
    unwrapped = unwrap(model) if unwrapped is None else unwrapped
    partitioned = head_is_partitioned(unwrapped)
    index = packed.state_index[packed.completion_mask]
    final: dict[str, torch.Tensor] = {}
    decoder = unwrapped.get_decoder() if hasattr(unwrapped, "get_decoder") else None
    hook = None
    if isinstance(decoder, torch.nn.Module) and decoder is not unwrapped and not partitioned:
        hook = decoder.register_forward_hook(lambda _module, _args, output: final.update(hidden=output[0]))
    try:
        out = model(
            input_ids=packed.input_ids,
            position_ids=packed.position_ids,
            attention_mask=None,
            logits_to_keep=index if partitioned else 1,
            use_cache=False,
            output_hidden_states=hook is None and not partitioned,
        )
    finally:
        if hook is not None:
            hook.remove()
    if partitioned:
        return out.logits[0], None
    hidden = final["hidden"] if hook is not None else out.hidden_states[-1]
    return hidden[0, index], unwrapped.get_output_embeddings()


def packed_token_logprobs(
    model: torch.nn.Module,
    packed: PackedInputs,
    completion_ids: torch.Tensor,
    warpers: Warpers = Warpers(),
    with_entropy: bool = False,
    chunk_size: int = 1024,
    unwrapped: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t | x, y_<t) (and the entropy) of every completion token at `warpers`, `[b, Tc]` in
    the collated (right-padded) layout, from one packed forward pass: what
    `models.scoring.completion_logprobs` gives for the same rows, 0 at padding. The output head
    runs on the real completion tokens only."""
    mask = packed.completion_mask
    states, head = packed_states(model, packed, unwrapped)
    targets = completion_ids.to(mask.device)[mask]
    logp, entropy = states_token_logprobs(
        states.unsqueeze(0), head, targets.unsqueeze(0), temperature=warpers.temperature,
        chunk_size=chunk_size, with_entropy=with_entropy, top_k=warpers.top_k, top_p=warpers.top_p,
    )  # fmt: skip

    def scatter(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(mask.shape)
        return out.masked_scatter(mask, values[0])

    return scatter(logp), (scatter(entropy) if entropy is not None else None)


@torch.no_grad()
def verify_packing(model: torch.nn.Module, lengths: tuple[int, ...] = (5, 3, 7), atol: float = 1e-4) -> float:
    """Run a probe of random sequences packed and one by one; return the largest difference of their
    final-position logits, and raise when it exceeds `atol` (the backend let packed sequences see
    each other, or ignored their positions)."""
    reason = packing_support(model)
    if reason is not None:
        raise ValueError(reason)
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(2, vocab, (n,), generator=generator).to(device) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        packed = model(
            input_ids=torch.cat(sequences).unsqueeze(0), position_ids=positions, attention_mask=None, use_cache=False
        ).logits[0]
        alone = torch.cat([model(input_ids=s.unsqueeze(0), use_cache=False).logits[0] for s in sequences])
    finally:
        model.train(was_training)
    difference = float((packed.float() - alone.float()).abs().max())
    if difference > atol:
        raise RuntimeError(
            f"packed sequences differ from the same sequences alone by {difference:.2e} (> {atol}) with attention "
            f"{attention_backend(model)!r}: this model does not keep packed sequences apart; use length-bucketed "
            "padded micro-batches instead"
        )
    return difference
