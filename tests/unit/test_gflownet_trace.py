"""GFlowNet trajectories on the one trace cutter (`templates.TraceCutter`, first marker).

The likelihood reward of `terminal: eos` needs the trace of every prefix s_k; the trainer reads it off
the completion's own cut (`Trajectory.prefix_trace`) instead of cutting each prefix. Checked here: that
equals the cutter run on each prefix, for the plain format (where it also equals the token-id match
the trainer used before the cutter) and for realistic chat completions on a byte-level BPE tokenizer,
whose tokens for `\\boxed{` depend on the text around it.
"""

from test_templates import CHAT_COMPLETIONS, bpe_chat_tokenizer

from reasoning.data.templates import PlainTemplate, TraceCutter, cut_trace, encode, template_for
from reasoning.models.tiny import build_char_tokenizer
from reasoning.trainers.gflownet import Trajectory


def prefix_traces_match(template, tokenizer, text):
    """Every prefix's trace and marker from the completion's cut equal the cutter on the prefix."""
    cutter = TraceCutter(template, tokenizer, at="first")
    ids = encode(tokenizer, text) + [tokenizer.eos_token_id]
    cut = cutter(ids, truncated=False)
    eos_trajectory = Trajectory(ids, len(ids) - 1, True, cut)
    for k in range(len(ids)):
        own = cutter(ids[:k], truncated=True)  # a prefix never ends with the stop token
        expected = (own.trace, own.marker) if own.marker_found else (ids[:k], None)
        assert eos_trajectory.prefix_trace(k, "eos") == expected, (text, k)
    if cut.marker_found:  # terminal: answer — the trajectory is the trace, ⊤ the marker's first token
        n = len(cut.trace)
        answer_trajectory = Trajectory(ids, n, True, cut)
        assert answer_trajectory.prefix_trace(n, "answer") == (cut.trace, cut.marker)
        for k in range(n):
            assert answer_trajectory.prefix_trace(k, "answer") == (ids[:k], None)
    return cut


def test_prefix_traces_are_the_cutter_on_each_prefix_plain():
    template, tokenizer = PlainTemplate(), build_char_tokenizer()
    marker_ids = encode(tokenizer, template.answer_prefix)
    eos = tokenizer.eos_token_id
    for text in ("1+2=3\nA:3", "no marker here", "2\nA:4\nA:5", "\nA:7", "12\nA", ""):
        cut = prefix_traces_match(template, tokenizer, text)
        by_ids = cut_trace(encode(tokenizer, text) + [eos], marker_ids, {eos}, False, at="first")
        assert (cut.trace, cut.marker_found) == (by_ids.trace, by_ids.marker_found), text
        assert cut.marker in (None, template.answer_prefix)


def test_prefix_traces_are_the_cutter_on_each_prefix_chat():
    tokenizer = bpe_chat_tokenizer()
    template = template_for(tokenizer)
    for text, before in CHAT_COMPLETIONS:
        cut = prefix_traces_match(template, tokenizer, text)
        assert cut.marker_found and before.startswith(tokenizer.decode(cut.trace)), text
