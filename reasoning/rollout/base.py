"""The rollout interface every backend implements; nothing here knows about losses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by every engine (the same warpers must be used when scoring).

    `temperature=0` means greedy decoding. `top_k=0` and `top_p=1` disable those warpers.
    `stop` strings end a completion (the stop string is kept out of the text, as in vLLM);
    `stop_token_ids` end it on a token (EOS is always a stop token). `seed` makes sampling
    reproducible for one call.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: force exactly max_tokens tokens

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollout:
    """One sampled completion of one prompt.

    `logprobs[t]` is the behaviour policy's log-probability of `completion_ids[t]` under the
    sampling distribution actually used (after temperature; for greedy decoding the
    untempered log-probability). `finish_reason` is "stop" (EOS or a stop string/id) or
    "length" (hit max_tokens: the completion is truncated).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str
    prompt_index: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


# Keys under which model configs state their context length, in the order vLLM reads them.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
# transformers' placeholder `model_max_length` when a tokenizer states none (VERY_LARGE_INTEGER)
_NO_TOKENIZER_LIMIT = 10**18


def context_length(config: Any, tokenizer: Any = None) -> tuple[int | None, str]:
    """(the longest prompt + completion the model can attend over, where that number comes from).

    The model config's context length (`max_position_embeddings` or the first of `CONTEXT_KEYS` it
    has, also looked up in a multimodal config's `text_config`), lowered to the tokenizer's
    `model_max_length` when that is smaller and actually set. vLLM derives its own limit the same
    way, so a `max_model_len` above this number is refused there too. `(None, "")` when neither
    states a limit.
    """
    length, source = None, ""
    for holder in (config, getattr(config, "text_config", None)):
        for key in CONTEXT_KEYS:
            value = getattr(holder, key, None) if holder is not None else None
            if isinstance(value, int) and value > 0:
                length, source = value, f"the model's {key}"
                break
        if length is not None:
            break
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_TOKENIZER_LIMIT and (length is None or limit < length):
        length, source = limit, "the tokenizer's model_max_length"
    return length, source


class RolloutEngine(Protocol):
    """What trainers and the evaluator need from a generation backend."""

    def generate(
        self, prompt_ids: list[list[int]], sampling: Sampling, n: int = 1, seeds: list[int] | None = None
    ) -> list[list[Rollout]]:
        """Return, for each prompt, `n` rollouts sampled with `sampling`.

        `seeds` (one per prompt) overrides `sampling.seed`: prompt i's completions then depend only on
        the prompt and `seeds[i]`, not on which other prompts share the call. Data-parallel trainers
        rely on this so that a prompt's group is the same whichever rank generates it.
        """
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine generate from `model`'s current weights."""
        ...

    def close(self) -> None:
        """Free the engine's resources."""
        ...
