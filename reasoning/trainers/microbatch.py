"""Token-budget micro-batches: which rows of a generation batch go through the model together.

A generation batch of N sequences of very different lengths, padded to its longest, spends most
of its training FLOPs on padding (reasoning completions vary 10–100× in length). Here the rows
are sorted by length and cut into micro-batches whose *padded* token count (rows × the longest
row) fits `max_tokens_per_microbatch`, or — for padding-free packing, where a micro-batch is one
row of concatenated sequences — whose summed length fits it.

Pure functions of the lengths (no model, no torch state): the same lengths give the same plan on
every run and every rank. The gradient of the step is unchanged when each micro-batch's loss is
its share of the whole batch's loss (`reasoning.objectives.policy.microbatch_loss`), not a mean
over the micro-batch. `slice_rows` cuts a micro-batch out of a collated batch (left-padded
prompts, right-padded completions) and trims the columns that are padding in every one of its rows.
`plan_step` deals one optimizer step's chunks into the fixed number of micro-steps a training loop
counts; `check_token_budget` checks the trainer settings (`RolloutTrainerConfig.max_tokens_per_microbatch`,
`padding_free`) when a trainer is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatch:
    """Rows of a batch that go through the model together.

    `indices`: the rows, longest first. `width`: the padded row width (prompt + completion; with
    `prompt_lengths` the longest prompt plus the longest completion, as left/right padding lays them
    out) or, `packed`, the length of the one packed row. `tokens`: the real (non-pad) tokens.
    """

    indices: tuple[int, ...]
    width: int
    tokens: int
    packed: bool = False

    @property
    def cost(self) -> int:
        """Tokens the forward pass processes: rows × width, or the packed row's length."""
        return self.width if self.packed else len(self.indices) * self.width


def _check_lengths(lengths: Sequence[int], name: str) -> list[int]:
    out = [int(v) for v in lengths]
    bad = [i for i, v in enumerate(out) if v < 1]
    if bad:
        raise ValueError(f"{name}[{bad[0]}] = {out[bad[0]]}: every sequence needs at least one token")
    return out


class _Segments:
    """Width and real-token bookkeeping of a run of rows (padded layout)."""

    def __init__(self, totals: list[int], prompts: list[int] | None) -> None:
        self.totals, self.prompts = totals, prompts

    def width(self, rows: Sequence[int]) -> int:
        if self.prompts is None:
            return max(self.totals[i] for i in rows)
        completions = (self.totals[i] - self.prompts[i] for i in rows)
        return max(self.prompts[i] for i in rows) + max(completions)

    def make(self, rows: Sequence[int]) -> MicroBatch:
        return MicroBatch(tuple(rows), self.width(rows), sum(self.totals[i] for i in rows))


def plan_microbatches(
    lengths: Sequence[int],
    max_tokens_per_microbatch: int | None = None,
    *,
    num_microbatches: int | None = None,
    prompt_lengths: Sequence[int] | None = None,
    max_sequences: int | None = None,
    packed: bool = False,
) -> list[MicroBatch]:
    """Cut rows of lengths `lengths` (prompt + completion tokens each) into micro-batches.

    Rows are sorted longest first (ties by index, so the plan is deterministic) and every row
    lands in exactly one micro-batch. Give exactly one of:
    - `max_tokens_per_microbatch`: each micro-batch's cost (`MicroBatch.cost`: rows × width, or the
      summed length when `packed`) is at most this; as few micro-batches as the greedy fill of
      the sorted rows gives (the fewest possible for contiguous runs of the sorted rows). Packed
      rows are filled first-fit decreasing.
    - `num_microbatches`: exactly this many micro-batches (padded layout), contiguous runs of the
      sorted rows with the largest cost as small as possible — for a training loop that needs a
      fixed number of micro-steps per optimizer step (transformers' gradient accumulation,
      DeepSpeed).
    `prompt_lengths` (optional, one per row) makes the padded width the longest prompt plus the
    longest completion, as left-padded prompts and right-padded completions are laid out.
    `max_sequences` caps the rows per micro-batch.
    """
    totals = _check_lengths(lengths, "lengths")
    prompts = None
    if prompt_lengths is not None:
        prompts = [int(p) for p in prompt_lengths]
        if len(prompts) != len(totals):
            raise ValueError(f"{len(prompts)} prompt_lengths for {len(totals)} lengths: give one per row")
        bad = [i for i, (p, t) in enumerate(zip(prompts, totals)) if not 0 <= p <= t]
        if bad:
            i = bad[0]
            raise ValueError(f"prompt_lengths[{i}] = {prompts[i]} must be in [0, lengths[{i}] = {totals[i]}]")
    if (max_tokens_per_microbatch is None) == (num_microbatches is None):
        raise ValueError("give exactly one of max_tokens_per_microbatch and num_microbatches")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1 (or None for no cap), got {max_sequences}")
    if not totals:
        return []
    order = sorted(range(len(totals)), key=lambda i: (-totals[i], i))
    segments = _Segments(totals, prompts)
    if num_microbatches is not None:
        if packed:
            raise ValueError("num_microbatches plans padded micro-batches; use max_tokens_per_microbatch to pack")
        return _split_into(order, segments, num_microbatches, max_sequences)
    budget = int(max_tokens_per_microbatch)
    too_long = [i for i in order if (totals[i] if packed else segments.width([i])) > budget]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"sequence {i} has {segments.width([i])} tokens, more than max_tokens_per_microbatch = {budget}: "
            "raise the budget to at least the longest prompt + completion"
        )
    if packed:
        return _first_fit_decreasing(order, totals, budget, max_sequences)
    return [segments.make(rows) for rows in _greedy(order, segments, budget, max_sequences)]


def _greedy(order: list[int], segments: _Segments, budget: int, max_sequences: int | None) -> list[list[int]]:
    """Maximal runs of the sorted rows whose padded cost fits `budget`."""
    runs: list[list[int]] = []
    current: list[int] = []
    for i in order:
        candidate = current + [i]
        full = max_sequences is not None and len(candidate) > max_sequences
        if current and (full or len(candidate) * segments.width(candidate) > budget):
            runs.append(current)
            candidate = [i]
        current = candidate
    runs.append(current)
    return runs


def _split_into(
    order: list[int], segments: _Segments, parts: int, max_sequences: int | None
) -> list[MicroBatch]:
    """Exactly `parts` runs of the sorted rows, the largest padded cost minimised (binary search
    on the budget of the greedy fill), then the runs with the most rows halved until there are
    `parts` of them."""
    if not 1 <= parts <= len(order):
        raise ValueError(f"num_microbatches = {parts} must be between 1 and the {len(order)} rows")
    if max_sequences is not None and parts * max_sequences < len(order):
        raise ValueError(
            f"{len(order)} rows do not fit {parts} micro-batches of at most max_sequences = {max_sequences}"
        )
    low = max(segments.width([i]) for i in order)
    high = len(order) * segments.width(order)
    while low < high:
        middle = (low + high) // 2
        if len(_greedy(order, segments, middle, max_sequences)) <= parts:
            high = middle
        else:
            low = middle + 1
    runs = _greedy(order, segments, low, max_sequences)
    while len(runs) < parts:
        k = max(range(len(runs)), key=lambda j: (len(runs[j]), -j))
        run = runs[k]
        runs[k : k + 1] = [run[: len(run) // 2], run[len(run) // 2 :]]
    return [segments.make(rows) for rows in runs]


def _first_fit_decreasing(
    order: list[int], totals: list[int], budget: int, max_sequences: int | None
) -> list[MicroBatch]:
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        for k, members in enumerate(rows):
            if used[k] + totals[i] <= budget and (max_sequences is None or len(members) < max_sequences):
                members.append(i)
                used[k] += totals[i]
                break
        else:
            rows.append([i])
            used.append(totals[i])
    return [MicroBatch(tuple(r), u, u, packed=True) for r, u in zip(rows, used)]


PROMPT_KEYS = ("prompt_ids", "prompt_mask")


def slice_rows(batch: dict[str, object], indices: Sequence[int]) -> dict[str, object]:
    """The rows `indices` of a collated batch, with the columns that are padding in all of them cut.

    Prompts are left-padded (`prompt_ids`, `prompt_mask`: the leading all-pad columns go) and
    completions right-padded (`completion_mask` and every other 2-D tensor of the completion
    width — log-probs, per-token advantages: the trailing all-pad columns go). Tensors with a
    first dimension of the batch's rows are indexed; anything else (scalars such as a token count,
    non-tensors) is passed through.
    """
    rows = len(batch["completion_mask"])  # type: ignore[arg-type]
    index = torch.as_tensor(list(indices), dtype=torch.long)
    completion_mask = batch["completion_mask"][index]  # type: ignore[index]
    completion_width = batch["completion_mask"].shape[1]  # type: ignore[union-attr]
    keep_completion = max(int(completion_mask.sum(dim=1).max()), 1) if len(index) else 1
    keep_prompt = None
    if "prompt_mask" in batch:
        prompt_mask = batch["prompt_mask"][index]  # type: ignore[index]
        keep_prompt = max(int(prompt_mask.sum(dim=1).max()), 1) if len(index) else 1
    out: dict[str, object] = {}
    for key, value in batch.items():
        if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != rows:
            out[key] = value
            continue
        value = value[index]
        if key in PROMPT_KEYS and keep_prompt is not None:
            value = value[:, value.shape[1] - keep_prompt :]
        elif key not in PROMPT_KEYS and value.dim() >= 2 and value.shape[1] == completion_width:
            value = value[:, :keep_completion]
        out[key] = value
    return out


def merge_rows(parts: Sequence[torch.Tensor], plan: Sequence[MicroBatch], rows: int, width: int) -> torch.Tensor:
    """Per-micro-batch outputs `[b_k, w_k, ...]` (e.g. the no-grad log-probs of each `slice_rows`
    part) back into one `[rows, width, ...]` tensor in the batch's row order, zeros beyond each
    part's width — the inverse of cutting a batch with `plan` and `slice_rows`."""
    if len(parts) != len(plan):
        raise ValueError(f"{len(parts)} outputs for {len(plan)} micro-batches: give one per micro-batch")
    first = parts[0]
    out = first.new_zeros((rows, width, *first.shape[2:]))
    for part, micro in zip(parts, plan):
        if part.shape[0] != len(micro.indices) or part.shape[1] > width:
            raise ValueError(
                f"an output of shape {tuple(part.shape)} does not fit a micro-batch of {len(micro.indices)} rows "
                f"and width <= {width}"
            )
        out[torch.as_tensor(micro.indices), : part.shape[1]] = part
    return out


def _rebuild(rows: Sequence[int], template: MicroBatch, segments: _Segments) -> MicroBatch:
    if template.packed:
        used = sum(segments.totals[i] for i in rows)
        return MicroBatch(tuple(rows), used, used, packed=True)
    return segments.make(rows)


def plan_step(
    lengths: Sequence[int],
    max_tokens_per_microbatch: int,
    micro_steps: int,
    *,
    prompt_lengths: Sequence[int] | None = None,
    packed: bool = False,
) -> list[list[MicroBatch]]:
    """The chunks of one optimizer step, grouped into exactly `micro_steps` training-loop micro-steps.

    The rows (`lengths`, prompt + completion tokens each) are cut into chunks that fit the budget
    (`plan_microbatches(lengths, max_tokens_per_microbatch, ...)`: length-sorted, trimmed to their own
    width, or packed rows); while there are fewer chunks than micro-steps the chunk with the most rows
    is halved; then the chunks (in plan order) are dealt into `micro_steps` consecutive groups whose
    sizes differ by at most one. transformers (and DeepSpeed) count a fixed number of micro-steps per
    optimizer step; the gradient is a sum over chunks, so which micro-step holds a chunk does not
    change it.
    """
    if micro_steps < 1:
        raise ValueError(f"micro_steps must be >= 1, got {micro_steps}")
    if len(lengths) < micro_steps:
        raise ValueError(f"{len(lengths)} rows cannot fill {micro_steps} micro-steps: give at least one row each")
    chunks = plan_microbatches(
        lengths, max_tokens_per_microbatch, prompt_lengths=prompt_lengths, packed=packed
    )
    prompts = None if prompt_lengths is None else [int(p) for p in prompt_lengths]
    segments = _Segments([int(v) for v in lengths], prompts)
    while len(chunks) < micro_steps:
        k = max(range(len(chunks)), key=lambda j: (len(chunks[j].indices), -j))
        rows = chunks[k].indices
        half = len(rows) // 2
        chunks[k : k + 1] = [_rebuild(rows[:half], chunks[k], segments), _rebuild(rows[half:], chunks[k], segments)]
    base, extra = divmod(len(chunks), micro_steps)
    groups, start = [], 0
    for step in range(micro_steps):
        size = base + (step < extra)
        groups.append(chunks[start : start + size])
        start += size
    return groups


def check_token_budget(
    max_tokens_per_microbatch: int | None,
    padding_free: object,
    longest_prompt: int,
    max_tokens: int,
) -> None:
    """Raise a ValueError naming the setting to change unless the token-budget settings can plan
    every batch: the budget holds the longest sequence a generation can make (the longest training
    prompt + the rollout's `max_tokens`), and `padding_free` is true, false or "auto" (true only with
    a budget: packing cuts the budget's chunks into rows)."""
    if padding_free not in (True, False, "auto"):
        raise ValueError(f"padding_free must be true, false or 'auto', got {padding_free!r}")
    if max_tokens_per_microbatch is None:
        if padding_free is True:
            raise ValueError(
                "padding_free: true packs the chunks of a token budget; set max_tokens_per_microbatch too "
                "(e.g. 4096) or leave padding_free at 'auto'"
            )
        return
    if isinstance(max_tokens_per_microbatch, bool) or not isinstance(max_tokens_per_microbatch, int):
        raise ValueError(f"max_tokens_per_microbatch must be an integer or None, got {max_tokens_per_microbatch!r}")
    longest = longest_prompt + max_tokens
    if max_tokens_per_microbatch < longest:
        raise ValueError(
            f"max_tokens_per_microbatch = {max_tokens_per_microbatch} cannot hold the longest sequence a generation "
            f"can make: the longest training prompt ({longest_prompt} tokens) + rollout max_tokens ({max_tokens}) = "
            f"{longest}; set it to at least {longest} (a few times that lets short sequences share a forward pass)"
        )
