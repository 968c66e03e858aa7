"""The variational pipeline's trace rows (`variational_stages.trace_row`): cut before the *last* answer
marker, on the plain format (character tokenizer) and on a chat model's completions (byte-level BPE),
and laid out for answer scoring after the completion's own marker, as `stage_scores` does."""

from test_templates import bpe_chat_tokenizer

from reasoning.data.templates import (
    ChatTemplate,
    PlainTemplate,
    TraceCutter,
    answer_layout,
    encode,
    template_for,
)
from reasoning.models.tiny import build_char_tokenizer
from reasoning.rollout import Rollout
from reasoning.trainers.variational_stages import trace_row


def rollout(tokenizer, text: str, finish_reason: str = "stop") -> Rollout:
    ids = encode(tokenizer, text) + ([tokenizer.eos_token_id] if finish_reason == "stop" else [])
    return Rollout(
        prompt_ids=[0], completion_ids=ids, logprobs=[0.0] * len(ids), finish_reason=finish_reason, text=text
    )


def test_plain_rows_cut_before_the_last_marker_and_keep_invalid_completions_whole():
    tokenizer = build_char_tokenizer()
    template = template_for(tokenizer)
    assert isinstance(template, PlainTemplate)
    cutter = TraceCutter(template, tokenizer, at="last")
    row = trace_row(rollout(tokenizer, "2+0=2\nA:2\nA:42"), cutter)
    assert row["trace"] == "2+0=2\nA:2" and row["marker"] == "\nA:" and row["valid"]
    assert row["trace_ids"] == encode(tokenizer, "2+0=2\nA:2")
    # no marker, or nothing before it: invalid, the whole completion without EOS, no marker
    for text in ("2+0=2 no answer", "\nA:42"):
        row = trace_row(rollout(tokenizer, text), cutter)
        assert not row["valid"] and row["marker"] is None and row["trace"] == text
    # cut by the token budget: the trace is cut, but the row is not valid
    row = trace_row(rollout(tokenizer, "2+0=2\nA:4", finish_reason="length"), cutter)
    assert row["trace"] == "2+0=2" and not row["valid"]
    # scored after the marker: the answer's own tokens, then EOS
    laid = answer_layout(
        template, tokenizer, [0], row["trace_ids"], "42", score_eos=True, marker=row["marker"]
    )
    assert laid.ids[laid.answer_start :] == encode(tokenizer, "42") + [tokenizer.eos_token_id]


def test_chat_rows_cut_before_the_last_box_the_model_wrote():
    tokenizer = bpe_chat_tokenizer()
    template = template_for(tokenizer)
    assert isinstance(template, ChatTemplate)
    cutter = TraceCutter(template, tokenizer, at="last")
    text = "Hence \\boxed{5}. Wait, that is wrong; the answer is $\\boxed{6}$."
    row = trace_row(rollout(tokenizer, text), cutter)
    end = text.rfind("\\boxed{") + len("\\boxed{")
    assert row["valid"] and row["marker"].endswith("\\boxed{")
    assert row["trace"] + row["marker"] == text[:end]  # whole tokens before the last box, then its own text
    assert tokenizer.decode(row["trace_ids"]) == row["trace"]
    laid = answer_layout(template, tokenizer, [], row["trace_ids"], "6", score_eos=True, marker=row["marker"])
    closing = "}$" if row["marker"].endswith("$\\boxed{") else "}"
    assert tokenizer.decode(laid.ids) == text[:end] + "6" + closing + tokenizer.eos_token
    # a chat completion without a box is not a usable trace
    row = trace_row(rollout(tokenizer, "I am not sure."), cutter)
    assert not row["valid"] and row["marker"] is None and row["trace"] == "I am not sure."
