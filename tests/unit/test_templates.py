"""Templates: prior / posterior prompts, answer extraction, answer scoring split at token boundaries."""

from reasoning.data.templates import ChatTemplate, PlainTemplate, encode, scoring_ids, template_for
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


def test_scoring_ids_split_the_answer_at_token_boundaries():
    tokenizer = build_char_tokenizer()
    template = PlainTemplate()
    prompt = encode(tokenizer, template.prior_prompt("12+30"))
    trace = encode(tokenizer, "2+0=2,1+3=4")
    scored = scoring_ids(template, tokenizer, prompt, trace, "42")
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
