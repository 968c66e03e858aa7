"""Prompt templates shared by every trainer.

Three roles, one set of weights:
- prior π(z, y | x): the question alone, then the trace z, then the answer y;
- posterior q(z | x, y′): the question with an answer hint y′, then the trace;
- answer scoring π(y* | x, z): the prior prompt and a trace, then the reference answer y*, split
  at token boundaries so its log-likelihood is a sum over exactly its own tokens (`answer_layout`).

Tiny models use a plain format (`PlainTemplate`); real models use the tokenizer's chat template
(`ChatTemplate`). `template_for(tokenizer)` picks one.

The one trace cutter (`cut_trace`, or `TraceCutter` for a template) splits a *generated* completion
at its answer marker (`Template.answer_marker`), the first or the last one (`at`, always explicit):
`"\nA:"` for the plain format, `\boxed{` for chat models (which write their answer in a box where
and how they like, rarely after the exact `answer_prefix` that `completion` writes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from reasoning.data.answers import extract_answer


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

    @property
    def answer_marker(self) -> str:
        """Where a generated completion's answer starts (what `cut_trace` looks for)."""
        return self.answer_prefix

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

    def answer_suffix(self, marker: str | None = None) -> str:
        """Text scored after the answer (none: the answer ends at EOS)."""
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
    # chat models box their answer wherever they like: the cutter looks for the box itself
    answer_marker: str = "\\boxed{"

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
        return text, extract_answer(text)

    def answer_suffix(self, marker: str | None = None) -> str:
        """What closes the answer after the marker `marker` (default `answer_prefix`): the box's brace,
        and the math span's `$` when the marker opened one (`$\\boxed{` -> `}$`, `\\[\\boxed{` -> `}`)."""
        marker = self.answer_prefix if marker is None else marker
        return self.answer_end if marker.rstrip().endswith("$" + self.answer_marker) else "}"


Template = PlainTemplate | ChatTemplate


def template_for(tokenizer: PreTrainedTokenizerBase) -> Template:
    """Chat template when the tokenizer has one, else the plain tiny-model format."""
    return ChatTemplate() if getattr(tokenizer, "chat_template", None) else PlainTemplate()


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (templates carry their own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def find_last(ids: Sequence[int], pattern: Sequence[int]) -> int:
    """Start of the last occurrence of the token sequence `pattern` in `ids`, or −1."""
    starts = _occurrences(list(ids), list(pattern))
    return starts[-1] if starts else -1


def _occurrences(ids: list[int], pattern: list[int]) -> list[int]:
    width = len(pattern)
    if not width:
        return []
    return [i for i in range(len(ids) - width + 1) if ids[i : i + width] == pattern]


# ---------------------------------------------------------------------- the trace cutter
@dataclass(frozen=True)
class TraceCut:
    """A generated completion cut at its answer marker.

    `trace`: the completion's tokens before the chosen answer marker (without one: the whole
    completion minus a final stop token). `policy_length`: how many leading completion tokens a
    policy term over "the trace" covers — the trace *and* the marker's tokens when there is a marker
    (a likelihood reward depends on where the policy chose to write the marker, so ∇ log π(z) must
    include it, as VeriFree's think span `…<answer` does), else the whole completion.
    `marker_count`: occurrences of the marker. `marker`: the completion's own text from the end of
    `trace` through the end of the marker (`"\\nA:"`, or `" $\\boxed{"` when the token holding the
    box also holds the `$` before it); None without a marker or when cut on token ids (then the
    template's `answer_prefix` stands for it). `answer_layout(..., marker=cut.marker)` continues the
    trace with it.
    """

    trace: list[int]
    policy_length: int
    marker_found: bool
    marker_count: int
    truncated: bool
    marker: str | None = None

    @property
    def missing(self) -> bool:
        """No answer marker: y* has no place to follow the trace."""
        return not self.marker_found


def cut_trace(
    completion_ids: Sequence[int],
    marker: Sequence[int] | str,
    stop_ids: Iterable[int],
    truncated: bool,
    *,
    at: Literal["first", "last"],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> TraceCut:
    """Cut a generated completion before its first or last answer marker, `-> TraceCut`.

    A final stop token (in `stop_ids`: EOS or a stop id) of a completion that was not `truncated`
    is dropped first. `marker` is either token ids, matched on the ids (an empty one never matches),
    or text, matched on the completion decoded by `tokenizer` and mapped back to token boundaries: the
    trace is the tokens wholly before the marker's first character, the policy span ends with the
    token holding its last character. Matching text is what makes the cut work for real tokenizers,
    whose tokens for `\\boxed{` depend on the text around it; for a character tokenizer both agree.

    `at="first"`: the released VeriFree (`model_response.find("<answer")`), LaTRO (first stop
    sequence) and variational-reasoning GML (`find('<|end_of')`) code cut there; whether a position
    ends the trace then depends only on the tokens up to it (a stopping time), which is what makes
    E[R ∇log π(trace + marker)] the exact gradient of E[R] — a cut at the last marker depends on
    later tokens and biases it. `at="last"`: the last answer is the one a reader takes (the
    variational-reasoning pipeline's and the online trainer's traces, whose weights are not
    differentiated through the cut).
    """
    if at not in ("first", "last"):
        raise ValueError(f'at must be "first" or "last", got {at!r}')
    ids = list(completion_ids)
    if not truncated and ids and ids[-1] in set(stop_ids):
        ids = ids[:-1]
    if isinstance(marker, str):
        if tokenizer is None:
            raise ValueError("cutting at a text marker needs the tokenizer that made the completion")
        return _cut_on_text(ids, marker, truncated, at, tokenizer, len(completion_ids))
    pattern = list(marker)
    starts = _occurrences(ids, pattern)
    if not starts:
        return TraceCut(ids, len(completion_ids), False, 0, truncated)
    start = starts[0] if at == "first" else starts[-1]
    return TraceCut(ids[:start], start + len(pattern), True, len(starts), truncated)


def _cut_on_text(
    ids: list[int], marker: str, truncated: bool, at: str, tokenizer: PreTrainedTokenizerBase, whole: int
) -> TraceCut:
    def length(k: int) -> int:  # characters of the first k tokens' text
        return len(tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False))

    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    starts, i = [], text.find(marker) if marker else -1
    while i >= 0:
        starts.append(i)
        i = text.find(marker, i + 1)
    if not starts:
        return TraceCut(ids, whole, False, 0, truncated)
    begin = starts[0] if at == "first" else starts[-1]
    end = begin + len(marker)
    # binary searches over prefix lengths (non-decreasing in k): the last token boundary at or before
    # the marker's start, and the first one at or after its end
    low, high = 0, len(ids)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if length(middle) <= begin else (low, middle - 1)
    cut = low
    low, high = cut, len(ids)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if length(middle) >= end else (middle + 1, high)
    return TraceCut(ids[:cut], low, True, len(starts), truncated, text[length(cut) : end])


class TraceCutter:
    """`cut_trace` with a template's answer marker, matched on text (`template.answer_marker`).

    `stop_ids`: the tokens a finished completion may end with (EOS and the sampling's stop ids).
    """

    def __init__(
        self,
        template: Template,
        tokenizer: PreTrainedTokenizerBase,
        *,
        at: Literal["first", "last"],
        stop_ids: Iterable[int | None] = (),
    ) -> None:
        self.template, self.tokenizer, self.at = template, tokenizer, at
        self.marker = template.answer_marker
        self.stop_ids = {tokenizer.eos_token_id, *stop_ids} - {None}

    def __call__(self, completion_ids: Sequence[int], truncated: bool) -> TraceCut:
        return cut_trace(
            completion_ids, self.marker, self.stop_ids, truncated, at=self.at, tokenizer=self.tokenizer
        )


def posterior_columns(
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    row: dict[str, Any],
    hint_column: str,
    hint_after: bool = False,
) -> dict[str, Any]:
    """The posterior prompt q(z|x, y′) of a dataset row as text (`posterior_prompt`) and ids
    (`posterior_prompt_ids`); the hint y′ is the row's `hint_column`."""
    if hint_column not in row:
        raise ValueError(
            f"the posterior prompt needs the hint column {hint_column!r} in the training data; it has {sorted(row)}"
        )
    text = template.posterior_prompt(row["question"], str(row[hint_column]), tokenizer, hint_after=hint_after)
    return {"posterior_prompt": text, "posterior_prompt_ids": encode(tokenizer, text)}


def answer_layout(
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[int],
    trace_ids: Sequence[int],
    answer: str,
    *,
    score_eos: bool,
    marker: str | None = None,
) -> ScoringIds:
    """prompt + trace + marker + y* (+ the answer's closing suffix) (+ EOS when `score_eos`).

    The trace is taken as the token ids the policy generated (never re-tokenised); the marker
    (`TraceCut.marker`, the completion's own text; default the template's `answer_prefix`) and the
    answer are tokenised separately and appended, so `ids[answer_start:]` is exactly the answer's
    own tokens (with its suffix, and EOS when scored) and nothing of the trace. The released
    VeriFree, RLPR, NOVER and variational-reasoning GML code do not score EOS; the variational
    pipeline's and GFlowNet's scores do. A reference answer with no token to score is an error.
    """
    marker = template.answer_prefix if marker is None else marker
    prefix_ids = encode(tokenizer, marker)
    answer_ids = encode(tokenizer, answer + template.answer_suffix(marker))
    if score_eos and tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    if not answer_ids:
        raise ValueError(f"reference answer {answer!r} has no token to score; give a non-empty answer")
    trace_start = len(prompt_ids)
    ids = list(prompt_ids) + list(trace_ids) + prefix_ids
    return ScoringIds(ids=ids + answer_ids, trace_start=trace_start, answer_start=len(ids))
