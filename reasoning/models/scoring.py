"""The scoring layer: teacher-forced log-probabilities of given tokens under a model.

Every trainer scores through these functions (no trainer runs its own forward for log-probs):

- `completion_logprobs(model, batch, warpers=..., with_entropy=...)`: per-token log-probs (and
  entropies) of right-padded completions after left-padded prompts (`pack_completions` builds such a
  batch), at the sampling warpers (temperature, top-k, top-p: `Warpers`) so that importance ratios
  against the sampler are exact. `CompletionForward` is the same with the forward kept: score row
  slices at different warpers (CoVRL's prior, posterior and answer rows in one forward), read the
  final hidden states after each prefix (GFlowNet's flow heads) or the log-prob of one token after
  every prefix (its termination probabilities).
- `no_grad_chunks(fn, batch, rows)`: `fn` over row chunks of a batch without a graph, outputs
  concatenated on the CPU (old / reference / base log-probs of a whole generation).
- `answer_logprobs(model, layouts, ...)`: log p(y*|x, z) token by token after a trace, on
  `data.templates.answer_layout` sequences (whose `score_eos` says whether EOS is scored), and
  optionally the trace's own log-prob — the one scorer of reference answers (likelihood rewards,
  GML / L estimates, GFlowNet's likelihood reward, CoVRL, the online variational trainer).
- `span_token_logprobs(model, sequences, span_starts)`: log-probs of the tail of each sequence.

How a forward is run (`final_states`): the final hidden states are taken from the decoder with a hook
and the output head is applied chunk by chunk (`objectives.logprobs.token_logprobs_from_hidden`), so
no full-vocabulary logits exist for the whole batch. Under DeepSpeed ZeRO-3 the head's weight is an
empty partition outside the forward: the logits then come from the forward itself
(`logits_to_keep`), which gathers the weight and reduces its gradient. Padding positions of a
completion score 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from accelerate.utils import extract_model_from_parallel

from reasoning.data.templates import ScoringIds
from reasoning.objectives.logprobs import (
    entropy_from_logits,
    token_logprobs_from_hidden,
    token_logprobs_from_logits,
)


@dataclass(frozen=True)
class Warpers:
    """The sampling distribution's warpers: softmax(ℓ/τ) restricted to the top k / the top-p nucleus.

    `Warpers()` is the model's own distribution (temperature 1, no filter).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 to score tokens, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k} and {self.top_p}")

    @classmethod
    def of(cls, sampling: Any, top_k_top_p: bool = True) -> Warpers:
        """The warpers of a `rollout.Sampling` (greedy, temperature 0, scores at temperature 1);
        `top_k_top_p=False` keeps only the temperature."""
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        if not top_k_top_p:
            return cls(temperature)
        return cls(temperature, int(sampling.top_k or 0), float(sampling.top_p))

    @property
    def filters(self) -> bool:
        return bool(self.top_k) or self.top_p < 1.0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP, a DeepSpeed engine or `torch.compile` (a PEFT model stays one)."""
    return extract_model_from_parallel(model)


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
    unwrapped: torch.nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep: int,
) -> FinalStates:
    """The last `keep` positions' final hidden states and the output head, or — when the head's
    weight is a ZeRO-3 partition — their logits.

    `model` is what is called (DDP, a DeepSpeed engine, or the module itself), `unwrapped` the
    transformers model inside it (None: `unwrap(model)`). The last layer's output is taken from the
    decoder with a hook rather than `output_hidden_states` (which keeps every layer's states alive,
    e.g. through a no-grad recomputation). No KV cache is built.
    """
    unwrapped = unwrap(model) if unwrapped is None else unwrapped
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
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(warp(ℓ))[target] (and the entropy) `[B, T]` from `final_states`' output sliced to
    the positions predicting `targets` `[B, T]`: hidden states through `head` chunk by chunk, or logits."""
    if head is None:
        entropy = entropy_from_logits(states, temperature, top_k, top_p) if with_entropy else None
        return token_logprobs_from_logits(states, targets, temperature, top_k, top_p), entropy
    return token_logprobs_from_hidden(
        states,
        head.weight,
        targets,
        bias=getattr(head, "bias", None),
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        top_k=top_k,
        top_p=top_p,
    )


# ---------------------------------------------------------------------- completions
def pack_completions(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """`prompt_ids` / `prompt_mask` `[B, P]` left-padded and `completion_ids` / `completion_mask`
    `[B, T]` right-padded (T ≥ 1), the batch layout every scoring function takes."""
    prompt_width = max((len(p) for p in prompts), default=0)
    width = max(max((len(c) for c in completions), default=0), 1)
    n = len(prompts)
    out = {
        "prompt_ids": torch.full((n, prompt_width), pad_id, dtype=torch.long),
        "prompt_mask": torch.zeros((n, prompt_width), dtype=torch.long),
        "completion_ids": torch.full((n, width), pad_id, dtype=torch.long),
        "completion_mask": torch.zeros((n, width), dtype=torch.long),
    }
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if prompt:
            out["prompt_ids"][i, prompt_width - len(prompt) :] = torch.as_tensor(list(prompt))
            out["prompt_mask"][i, prompt_width - len(prompt) :] = 1
        if completion:
            out["completion_ids"][i, : len(completion)] = torch.as_tensor(list(completion))
            out["completion_mask"][i, : len(completion)] = 1
    return out


def stack_completions(batches: Sequence[Mapping[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Several `pack_completions` batches as one (rows in order): prompts left-padded and completions
    right-padded to the widest, so that one `CompletionForward` scores them all."""
    prompt_width = max(b["prompt_ids"].shape[1] for b in batches)
    width = max(b["completion_ids"].shape[1] for b in batches)
    out: dict[str, list[torch.Tensor]] = {key: [] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    for b in batches:
        left, right = prompt_width - b["prompt_ids"].shape[1], width - b["completion_ids"].shape[1]
        out["prompt_ids"].append(torch.nn.functional.pad(b["prompt_ids"], (left, 0), value=pad_id))
        out["prompt_mask"].append(torch.nn.functional.pad(b["prompt_mask"], (left, 0), value=0))
        out["completion_ids"].append(torch.nn.functional.pad(b["completion_ids"], (0, right), value=pad_id))
        out["completion_mask"].append(torch.nn.functional.pad(b["completion_mask"], (0, right), value=0))
    return {key: torch.cat([t.to(parts[0].device) for t in parts]) for key, parts in out.items()}


class CompletionForward:
    """One forward pass over `prompt_ids + completion_ids` rows (the `pack_completions` layout).

    Position t of a completion is predicted by the state after the prompt and t completion tokens;
    `hidden [B, T+1, H]` holds the final hidden states after each prefix s_0..s_T (the prompt alone,
    then one more completion token each). `chunk_size` rows of B×T go through the output head at once.
    """

    def __init__(
        self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor], chunk_size: int = 1024
    ) -> None:
        device = next(model.parameters()).device
        self.completion_ids = batch["completion_ids"].to(device)
        self.completion_mask = batch["completion_mask"].to(device)
        input_ids = torch.cat([batch["prompt_ids"].to(device), self.completion_ids], dim=1)
        attention = torch.cat([batch["prompt_mask"].to(device), self.completion_mask], dim=1)
        width = self.completion_ids.shape[1]
        self.states, self.head, self.hidden = final_states(model, None, input_ids, attention, keep=width + 1)
        self.chunk_size = chunk_size

    def logprobs(
        self,
        warpers: Warpers = Warpers(),
        with_entropy: bool = False,
        rows: slice = slice(None),
        width: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log π(y_t | x, y_<t) (and the entropy of π(·| x, y_<t)) `[b, width]` for the rows `rows`
        over the first `width` completion positions (default all), at `warpers`; 0 at padding."""
        width = self.completion_ids.shape[1] if width is None else width
        targets = self.completion_ids[rows, :width]
        logp, entropy = states_token_logprobs(
            self.states[rows, :width],
            self.head,
            targets,
            temperature=warpers.temperature,
            chunk_size=self.chunk_size,
            with_entropy=with_entropy,
            top_k=warpers.top_k,
            top_p=warpers.top_p,
        )
        # padding may hold tokens a filter excludes (−inf): padding scores 0 (it is masked anyway)
        padding = ~self.completion_mask[rows, :width].bool()
        logp = logp.masked_fill(padding, 0.0)
        return logp, (entropy.masked_fill(padding, 0.0) if entropy is not None else None)

    def token_logprobs(self, token: int, warpers: Warpers = Warpers()) -> torch.Tensor:
        """log π(token | x, s_k) after every prefix s_0..s_T, `[B, T+1]` (e.g. a GFlowNet's ⊤)."""
        targets = torch.full(self.states.shape[:2], token, dtype=torch.long, device=self.states.device)
        logp, _ = states_token_logprobs(
            self.states,
            self.head,
            targets,
            temperature=warpers.temperature,
            chunk_size=self.chunk_size,
            top_k=warpers.top_k,
            top_p=warpers.top_p,
        )
        return logp


def completion_logprobs(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    warpers: Warpers = Warpers(),
    with_entropy: bool = False,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log π(y_t | x, y_<t) `[B, T]` of the completions of `batch` (and, with
    `with_entropy`, the entropies of π(·| x, y_<t)), at `warpers`, with the graph when grad is on.

    `batch`: `prompt_ids` / `prompt_mask` `[B, P]` left-padded, `completion_ids` / `completion_mask`
    `[B, T]` right-padded (other keys are ignored). Padding positions are 0.
    """
    return CompletionForward(model, batch, chunk_size).logprobs(warpers, with_entropy)


def _rows_of(batch: Mapping[str, Any]) -> int:
    if "completion_ids" in batch:
        return int(batch["completion_ids"].shape[0])
    return next(int(v.shape[0]) for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)


def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if first is None:
        return None
    if torch.is_tensor(first):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {key: _cat([part[key] for part in parts]) for key in first}
    if isinstance(first, tuple):
        return (
            type(first)(*(_cat(list(items)) for items in zip(*parts)))
            if hasattr(first, "_fields")
            else tuple(_cat(list(items)) for items in zip(*parts))
        )
    raise TypeError(f"no_grad_chunks: cannot concatenate outputs of type {type(first).__name__}")


def _to_cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, Mapping):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, tuple):
        items = [_to_cpu(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


@torch.no_grad()
def no_grad_chunks(fn: Callable[[dict[str, Any]], Any], batch: Mapping[str, Any], rows: int) -> Any:
    """`fn(part)` for consecutive parts of `rows` rows of `batch`, without a graph, the outputs (a
    tensor, a tuple / named tuple or a dict of tensors, None entries allowed) concatenated along the
    rows on the CPU. Tensors with a row dimension are sliced; other entries are passed whole."""
    n = _rows_of(batch)
    parts = []
    for start in range(0, n, rows):
        part = {
            key: value[start : start + rows] if torch.is_tensor(value) and value.dim() > 0 else value
            for key, value in batch.items()
        }
        parts.append(_to_cpu(fn(part)))
    return _cat(parts)


# ---------------------------------------------------------------------- spans and answers
@torch.no_grad()
def span_token_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    span_starts: Sequence[int],
    pad_id: int = 0,
    batch_size: int = 32,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """log π(s_t | s_<t) for t in [span_starts[i], len(sequences[i])) of every sequence.

    Returns one float32 tensor per sequence with `len(seq) − span_start` entries (on the CPU). A span
    must start after position 0 (the first token has no context). Each sequence is scored as prompt
    `seq[:start]` + completion `seq[start:]` (`completion_logprobs`), in batches of `batch_size`,
    longest first to keep padding small.
    """
    for i, (seq, start) in enumerate(zip(sequences, span_starts, strict=True)):
        if not 1 <= start <= len(seq):
            raise ValueError(f"sequence {i}: span start {start} must be in [1, {len(seq)}]")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[torch.Tensor | None] = [None] * len(sequences)
    warpers = Warpers(temperature)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        batch = pack_completions(
            [list(sequences[i][: span_starts[i]]) for i in chunk],
            [list(sequences[i][span_starts[i] :]) for i in chunk],
            pad_id,
        )
        logps, _ = completion_logprobs(model, batch, warpers)
        for row, i in enumerate(chunk):
            out[i] = logps[row, : len(sequences[i]) - span_starts[i]].float().cpu()
    return out  # type: ignore[return-value]


class AnswerLogprobs(NamedTuple):
    """`answer_logprobs`' output."""

    answer: torch.Tensor  # [N, A] log p(y*_t | x, z, y*_<t), 0 at padding
    answer_mask: torch.Tensor  # [N, A] bool
    trace: torch.Tensor | None  # [N] Σ log p over the trace and marker tokens (with_trace)
    trace_length: torch.Tensor | None  # [N] number of trace and marker tokens (with_trace)


@torch.no_grad()
def answer_logprobs(
    model: torch.nn.Module,
    layouts: Sequence[ScoringIds],
    pad_id: int = 0,
    batch_size: int = 64,
    with_trace: bool = False,
) -> AnswerLogprobs:
    """The answer-likelihood scorer: log p(y*|x, z) token by token, at temperature 1 (the model's own
    likelihood), for `data.templates.answer_layout` sequences prompt + trace + marker + y* (+ EOS when
    the layout was built with `score_eos=True`: the EOS rule is the layout's, explicit there).

    `with_trace` also scores the trace and marker tokens (the same pass, a longer span) and returns
    their sum log p(z, marker | x) and count. No graph; the model is run in the mode it is in.
    """
    starts = [s.trace_start if with_trace else s.answer_start for s in layouts]
    if with_trace and any(s.trace_start < 1 for s in layouts):
        raise ValueError("scoring a trace needs a prompt before it (trace_start >= 1)")
    spans = span_token_logprobs(model, [s.ids for s in layouts], starts, pad_id=pad_id, batch_size=batch_size)
    skip = [s.answer_start - start for s, start in zip(layouts, starts)]
    width = max([len(span) - k for span, k in zip(spans, skip)] + [1])
    answer = torch.zeros((len(spans), width))
    mask = torch.zeros((len(spans), width), dtype=torch.bool)
    for i, (span, k) in enumerate(zip(spans, skip)):
        answer[i, : len(span) - k] = span[k:]
        mask[i, : len(span) - k] = True
    if not with_trace:
        return AnswerLogprobs(answer, mask, None, None)
    trace = torch.tensor(
        [float(span[:k].double().sum()) for span, k in zip(spans, skip)], dtype=torch.float64
    )
    return AnswerLogprobs(answer, mask, trace, torch.tensor(skip))
