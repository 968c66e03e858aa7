"""Prompt templates shared by every trainer.

Three roles, one set of weights:
- prior π(z, y | x): the question alone, then the trace z, then the answer y;
- posterior q(z | x, y′): the question with an answer hint y′, then the trace;
- answer scoring π(y* | x, z): the prior prompt and a trace, then the reference answer y*, split
  at token boundaries so its log-likelihood is a sum over exactly its own tokens.

Tiny models use a plain format (`PlainTemplate`); real models use the tokenizer's chat template
(`ChatTemplate`). `template_for(tokenizer)` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ScoringIds:
    """Token ids of prompt + trace + answer, with the spans of the trace and the answer.

    `ids[trace_start:answer_start]` are the trace tokens (including the answer prefix), and
    `ids[answer_start:]` are exactly the answer tokens (with the end-of-answer suffix).
    """

    ids: list[int]
    trace_start: int
    answer_start: int


@dataclass(frozen=True)
class PlainTemplate:
    """`Q:{question}\\nT:{trace}\\nA:{answer}<eos>`; the posterior adds `H:{hint}` before `T:`.

    With `hint_after=True` the posterior is the answer-then-explanation order
    `Q:{question}\\nA:{hint}\\nT:` (the answer stated first, the trace explains it).
    """

    question_prefix: str = "Q:"
    hint_prefix: str = "\nH:"
    trace_prefix: str = "\nT:"
    answer_prefix: str = "\nA:"

    def prior_prompt(self, question: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        return f"{self.question_prefix}{question}{self.trace_prefix}"

    def posterior_prompt(
        self,
        question: str,
        hint: str,
        tokenizer: PreTrainedTokenizerBase | None = None,
        hint_after: bool = False,
    ) -> str:
        prefix = self.answer_prefix if hint_after else self.hint_prefix
        return f"{self.question_prefix}{question}{prefix}{hint}{self.trace_prefix}"

    def completion(self, trace: str, answer: str) -> str:
        """The text a prior or posterior completion should be (EOS is appended at tokenisation)."""
        return f"{trace}{self.answer_prefix}{answer}"

    def split_completion(self, text: str) -> tuple[str, str | None]:
        """(trace, answer) of a generated completion; answer None when the marker is missing."""
        cut = text.rfind(self.answer_prefix)
        if cut < 0:
            return text, None
        answer = text[cut + len(self.answer_prefix) :].split("\n", 1)[0].strip()
        return text[:cut], answer

    def answer_suffix(self) -> str:
        return ""


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's chat template; the trace ends with a boxed final answer.

    Prior: user message = question + instruction. Posterior: the hint is added to the user
    message as a reference the assistant may use but must not quote.
    """

    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    hint_instruction: str = "A reference solution (use it to reason, do not mention it):"
    answer_prefix: str = "\n\nThe final answer is $\\boxed{"
    answer_end: str = "}$"

    def _chat(self, tokenizer: PreTrainedTokenizerBase, content: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def prior_prompt(self, question: str, tokenizer: PreTrainedTokenizerBase) -> str:
        return self._chat(tokenizer, f"{question}\n{self.instruction}")

    def posterior_prompt(
        self, question: str, hint: str, tokenizer: PreTrainedTokenizerBase, hint_after: bool = False
    ) -> str:
        if hint_after:
            content = f"{question}\nThe answer is {hint}. Explain how to reach it.\n{self.instruction}"
        else:
            content = f"{question}\n{self.hint_instruction}\n{hint}\n{self.instruction}"
        return self._chat(tokenizer, content)

    def completion(self, trace: str, answer: str) -> str:
        return f"{trace}{self.answer_prefix}{answer}{self.answer_end}"

    def split_completion(self, text: str) -> tuple[str, str | None]:
        from reasoning.rewards.math import extract_answer

        return text, extract_answer(text)

    def answer_suffix(self) -> str:
        return self.answer_end


Template = PlainTemplate | ChatTemplate


def template_for(tokenizer: PreTrainedTokenizerBase) -> Template:
    """Chat template when the tokenizer has one, else the plain tiny-model format."""
    return ChatTemplate() if getattr(tokenizer, "chat_template", None) else PlainTemplate()


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (templates carry their own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def find_last(ids: list[int], pattern: list[int]) -> int:
    """Start of the last occurrence of the token sequence `pattern` in `ids`, or −1.

    Splits a generated completion at the answer marker's tokens (never by string search on
    decoded text, which can disagree with the token boundaries).
    """
    width = len(pattern)
    for start in range(len(ids) - width, -1, -1):
        if ids[start : start + width] == pattern:
            return start
    return -1


def split_trace(
    completion_ids: list[int], marker_ids: list[int], stop_ids: set[int], stopped: bool
) -> tuple[list[int], bool]:
    """(trace ids, marker found): a generated completion cut before its last answer marker.

    The stop token is dropped first when the completion `stopped` on one of `stop_ids` (EOS or a
    stop id). Without a marker (or with an empty `marker_ids`) the whole completion is the trace.
    The cut is made on token ids (`find_last`), never on decoded text.
    """
    ids = list(completion_ids)
    if stopped and ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    cut = find_last(ids, marker_ids) if marker_ids else -1
    return (ids[:cut], True) if cut >= 0 else (ids, False)


def add_posterior_prompts(
    dataset: Any,
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    hint_column: str,
    hint_after: bool = False,
    max_prompt_length: int | None = None,
) -> Any:
    """A `datasets.Dataset` with the posterior prompt q(z|x, y′) of each row added, as text
    (`posterior_prompt`) and ids (`posterior_prompt_ids`); the hint y′ is the row's `hint_column`.
    Rows whose posterior prompt is longer than `max_prompt_length` tokens are dropped."""
    if hint_column not in dataset.column_names:
        raise ValueError(
            f"the posterior prompt needs the hint column {hint_column!r} in the training data; "
            f"it has {dataset.column_names}"
        )

    def add(row: dict[str, Any]) -> dict[str, Any]:
        text = template.posterior_prompt(
            row["question"], str(row[hint_column]), tokenizer, hint_after=hint_after
        )
        return {"posterior_prompt": text, "posterior_prompt_ids": encode(tokenizer, text)}

    dataset = dataset.map(add)
    if max_prompt_length:
        dataset = dataset.filter(lambda row: len(row["posterior_prompt_ids"]) <= max_prompt_length)
    return dataset


def scoring_ids(
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    trace_ids: list[int],
    answer: str,
) -> ScoringIds:
    """prompt + trace + answer-prefix + answer (+ suffix, EOS), split at token boundaries.

    The trace is taken as the token ids the policy generated (never re-tokenised); the answer
    prefix and the answer are tokenised separately and appended, so the answer span holds the
    answer's own tokens and nothing of the trace.
    """
    prefix_ids = encode(tokenizer, template.answer_prefix)
    answer_ids = encode(tokenizer, answer + template.answer_suffix())
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    trace_start = len(prompt_ids)
    ids = list(prompt_ids) + list(trace_ids) + prefix_ids
    return ScoringIds(ids=ids + answer_ids, trace_start=trace_start, answer_start=len(ids))
