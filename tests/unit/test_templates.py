"""Templates: prior / posterior prompts, answer extraction, answer scoring split at token boundaries,
the trace cutter on plain and chat completions."""

import pytest

from reasoning.data.templates import ChatTemplate, PlainTemplate, answer_layout, encode, template_for
from reasoning.models.tiny import build_char_tokenizer

CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def test_plain_template_round_trip():
    template = PlainTemplate()
    assert template.prior_prompt("3+4") == "Q:3+4\nT:"
    assert template.posterior_prompt("3+4", "7") == "Q:3+4\nH:7\nT:"
    assert template.posterior_prompt("3+4", "7", hint_after=True) == "Q:3+4\nA:7\nT:"
    text = template.completion("3+4=7", "7")
    assert template.split_completion(text) == ("3+4=7", "7")
    assert template.split_completion("no marker") == ("no marker", None)
    assert template.split_completion("a\nA: 12 \nextra") == ("a", "12")


def test_template_choice_follows_the_tokenizer():
    tokenizer = build_char_tokenizer()
    assert isinstance(template_for(tokenizer), PlainTemplate)
    tokenizer.chat_template = CHAT
    chat = template_for(tokenizer)
    assert isinstance(chat, ChatTemplate)
    prompt = chat.prior_prompt("What is 3+4?", tokenizer)
    assert prompt.startswith("<|user|>What is 3+4?") and prompt.endswith("<|assistant|>")
    assert "reference solution" in chat.posterior_prompt("q", "hint", tokenizer)
    assert chat.split_completion(chat.completion("so", "7"))[1] == "7"


def test_answer_layout_splits_the_answer_at_token_boundaries():
    tokenizer = build_char_tokenizer()
    template = PlainTemplate()
    prompt = encode(tokenizer, template.prior_prompt("12+30"))
    trace = encode(tokenizer, "2+0=2,1+3=4")
    scored = answer_layout(template, tokenizer, prompt, trace, "42", score_eos=True)
    assert scored.ids[: len(prompt)] == prompt
    assert scored.ids[scored.trace_start : scored.trace_start + len(trace)] == trace
    assert tokenizer.decode(scored.ids[scored.trace_start : scored.answer_start]) == "2+0=2,1+3=4\nA:"
    assert scored.ids[scored.answer_start :] == encode(tokenizer, "42") + [tokenizer.eos_token_id]


def test_find_last_splits_at_token_boundaries():
    from reasoning.data.templates import find_last

    assert find_last([5, 1, 2, 7, 1, 2, 9], [1, 2]) == 4
    assert find_last([5, 1, 2], [1, 2]) == 1
    assert find_last([5, 1, 3], [1, 2]) == -1
    assert find_last([], [1]) == -1


# ---------------------------------------------------------------------- the trace cutter
def bpe_chat_tokenizer():
    """A byte-level BPE tokenizer trained here on math text (its merges join `$\\`, `boxed`, `{` with
    neighbouring characters, as real tokenizers do) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Therefore the answer is $\\boxed{42}$. So we get \\[\\boxed{\\frac{1}{2}}\\] and $x = \\boxed{7}$.",
        "The final answer is $\\boxed{3}$. We compute 12 + 30 = 42, so the total is $\\boxed{42}$.",
        "Hence \\boxed{5}. Wait, that is wrong; the answer is \\boxed{6}. Let me reason step by step.",
    ] * 50
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|pad|>", "<|im_end|>"], initial_alphabet=alphabet)
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|pad|>")
    fast.chat_template = CHAT
    return fast


CHAT_COMPLETIONS = [
    # (completion text, first cut text, last cut text)
    (
        "We add 12 + 30 = 42. Therefore the answer is $\\boxed{42}$.",
        "We add 12 + 30 = 42. Therefore the answer is ",
    ),
    ("So we get \\[\\boxed{\\frac{1}{2}}\\]", "So we get \\["),
    ("Hence \\boxed{5}. Wait, that is wrong; the answer is \\boxed{6}.", "Hence "),
]


def test_chat_cutter_finds_the_box_a_real_tokenizer_splits_anyhow():
    from reasoning.data.templates import TraceCutter, answer_layout, cut_trace

    tokenizer = bpe_chat_tokenizer()
    template = template_for(tokenizer)
    assert isinstance(template, ChatTemplate) and template.answer_marker == "\\boxed{"
    eos = tokenizer.eos_token_id
    first = TraceCutter(template, tokenizer, at="first")
    last = TraceCutter(template, tokenizer, at="last")
    marker_ids = encode(tokenizer, template.answer_marker)
    unmatched = 0
    for text, before in CHAT_COMPLETIONS:
        ids = encode(tokenizer, text) + [eos]
        # token-id matching would miss some of these: the box's tokens depend on the text around it
        unmatched += cut_trace(ids, marker_ids, {eos}, False, at="first").missing
        for cutter, at in ((first, "first"), (last, "last")):
            cut = cutter(ids, truncated=False)
            start = text.find("\\boxed{") if at == "first" else text.rfind("\\boxed{")
            end = start + len("\\boxed{")
            assert cut.marker_found and cut.marker_count == text.count("\\boxed{")
            trace_text = tokenizer.decode(cut.trace)
            assert (
                trace_text == text[: len(trace_text)] and len(trace_text) <= start
            )  # whole tokens before the box
            assert trace_text + cut.marker == text[:end]  # the completion's own text through `\boxed{`
            covered = tokenizer.decode(ids[: cut.policy_length])
            assert len(covered) >= end and len(tokenizer.decode(ids[: cut.policy_length - 1])) < end
            if at == "first":
                assert text[:start].startswith(trace_text) and before.startswith(trace_text)
            # the answer is scored after the model's own marker, closed as it opened
            laid = answer_layout(template, tokenizer, [], cut.trace, "42", score_eos=False, marker=cut.marker)
            closing = "}$" if cut.marker.endswith("$\\boxed{") else "}"
            assert tokenizer.decode(laid.ids) == text[:end] + "42" + closing
            assert tokenizer.decode(laid.ids[laid.answer_start :]) == "42" + closing
    assert unmatched > 0
    none = first(encode(tokenizer, "I do not know.") + [eos], truncated=False)
    assert none.missing and none.marker is None and tokenizer.decode(none.trace) == "I do not know."
    truncated = first(encode(tokenizer, "The answer is $\\boxed{4"), truncated=True)
    assert truncated.marker_found and truncated.truncated


def test_plain_cutter_on_text_equals_the_cut_on_token_ids():
    from reasoning.data.templates import TraceCutter, cut_trace

    tokenizer = build_char_tokenizer()
    template = PlainTemplate()
    marker, eos = encode(tokenizer, template.answer_marker), tokenizer.eos_token_id
    texts = ["1+2=3\nA:3", "no marker", "a\nA:1\nA:2", "\nA:", "x\nA:5"]
    for at in ("first", "last"):
        cutter = TraceCutter(template, tokenizer, at=at)
        for text in texts:
            for truncated in (False, True):
                ids = encode(tokenizer, text) + ([] if truncated else [eos])
                on_text, on_ids = cutter(ids, truncated), cut_trace(ids, marker, {eos}, truncated, at=at)
                assert (on_text.trace, on_text.policy_length, on_text.marker_count, on_text.missing) == (
                    on_ids.trace,
                    on_ids.policy_length,
                    on_ids.marker_count,
                    on_ids.missing,
                )
                assert on_text.marker == (None if on_ids.missing else "\nA:")
    assert TraceCutter(template, tokenizer, at="last")(
        encode(tokenizer, "a\nA:1\nA:2"), True
    ).trace == encode(tokenizer, "a\nA:1")
    with pytest.raises(ValueError, match='"first" or "last"'):
        cut_trace([1], [1], set(), False, at="middle")
