"""The scoring layer (`reasoning.models.scoring`) against full-vocabulary logits of one unpadded forward.

The references apply transformers' own Temperature / TopK / TopP warpers to the full logits, so the
chunked hidden-state path, the ZeRO-3 logits path, the no-grad chunk helper and the answer scorer are
each checked against an independent computation on a real tiny model.
"""

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from reasoning.data.templates import PlainTemplate, answer_layout, encode
from reasoning.models.scoring import (
    CompletionForward,
    Warpers,
    answer_logprobs,
    completion_logprobs,
    no_grad_chunks,
    pack_completions,
    span_token_logprobs,
    stack_completions,
)
from reasoning.models.tiny import build_tiny_model
from reasoning.rollout import Sampling

WARPERS = [Warpers(), Warpers(0.7), Warpers(1.0, top_k=5), Warpers(0.8, top_p=0.9), Warpers(1.3, 7, 0.8)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model("1m", seed=0)
    model.eval()
    return model, tokenizer


def sequences(tokenizer, seed=0):
    """Prompts and completions of different lengths (real text, so both paddings are exercised)."""
    texts = [("Q:12+30\nT:", "2+0=2,1+3=4\nA:42"), ("Q:7+5\nT:", "7+5=12"), ("Q:100+1\nT:", "1")]
    return [encode(tokenizer, p) for p, _ in texts], [encode(tokenizer, c) for _, c in texts]


def reference(model, prompt, completion, warpers, token=None):
    """log p of each completion token (or of `token` after each prefix) and the entropies, warped full logits."""
    ids = torch.tensor([prompt + completion])
    logits = (
        model(input_ids=ids).logits[0, len(prompt) - 1 :].float()
    )  # predicts completion[0..], then one more
    processors = LogitsProcessorList([TemperatureLogitsWarper(warpers.temperature)])
    if warpers.top_k:
        processors.append(TopKLogitsWarper(warpers.top_k))
    if warpers.top_p < 1:
        processors.append(TopPLogitsWarper(warpers.top_p))
    logp = torch.log_softmax(processors(None, logits), dim=-1)
    entropy = -(torch.where(logp.isfinite(), logp.exp() * logp, torch.zeros_like(logp))).sum(-1)
    if token is not None:
        return logp[:, token]
    targets = torch.tensor(completion)
    return logp[:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy[:-1]


@pytest.mark.parametrize("warpers", WARPERS, ids=str)
@pytest.mark.parametrize("chunk_size", [1, 1024])
def test_completion_logprobs_equal_warped_full_logits(tiny, warpers, chunk_size):
    model, tokenizer = tiny
    prompts, completions = sequences(tokenizer)
    batch = pack_completions(prompts, completions, tokenizer.pad_token_id)
    with torch.no_grad():
        logp, entropy = completion_logprobs(model, batch, warpers, with_entropy=True, chunk_size=chunk_size)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            want, want_entropy = reference(model, p, c, warpers)
            torch.testing.assert_close(logp[i, : len(c)], want, atol=2e-5, rtol=0)
            torch.testing.assert_close(entropy[i, : len(c)], want_entropy, atol=2e-5, rtol=0)
            assert (logp[i, len(c) :] == 0).all() and (entropy[i, len(c) :] == 0).all()  # padding scores 0
    assert logp.dtype == torch.float32


def test_gradient_through_chunks_equals_the_full_logits_gradient(tiny):
    model, tokenizer = tiny
    prompts, completions = sequences(tokenizer)
    batch = pack_completions(prompts, completions, tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    warpers = Warpers(0.9, top_k=6)
    logp, _ = completion_logprobs(model, batch, warpers, chunk_size=3)
    got = torch.autograd.grad(logp.sum(), params)
    total = sum(reference(model, p, c, warpers)[0].sum() for p, c in zip(prompts, completions))
    want = torch.autograd.grad(total, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_zero3_logits_path_agrees(tiny, monkeypatch):
    """With the head marked as a ZeRO-3 partition the logits come from the forward (`logits_to_keep`)."""
    model, tokenizer = tiny
    prompts, completions = sequences(tokenizer)
    batch = pack_completions(prompts, completions, tokenizer.pad_token_id)
    warpers = Warpers(0.8, top_p=0.9)
    with torch.no_grad():
        hidden_path, _ = completion_logprobs(model, batch, warpers)
        monkeypatch.setattr(model.get_output_embeddings().weight, "ds_id", 0, raising=False)
        forward = CompletionForward(model, batch)
        assert forward.head is None  # logits, not hidden states
        logits_path, _ = forward.logprobs(warpers)
    torch.testing.assert_close(logits_path, hidden_path, atol=2e-5, rtol=0)


def test_forward_rows_hidden_states_and_token_after_every_prefix(tiny):
    model, tokenizer = tiny
    prompts, completions = sequences(tokenizer)
    first = pack_completions(prompts, completions, tokenizer.pad_token_id)
    second = pack_completions(
        [p + [5] for p in prompts], [c[:2] for c in completions], tokenizer.pad_token_id
    )
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        forward = CompletionForward(model, stack_completions([first, second], tokenizer.pad_token_id))
        n = len(prompts)
        rows, _ = forward.logprobs(Warpers(0.7), rows=slice(n, 2 * n), width=2)
        stops = forward.token_logprobs(eos)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            torch.testing.assert_close(
                rows[i, : len(c[:2])], reference(model, p + [5], c[:2], Warpers(0.7))[0], atol=2e-5, rtol=0
            )
            want = reference(model, p, c, Warpers(), token=eos)  # after s_0 .. s_T
            torch.testing.assert_close(stops[i, : len(c) + 1], want, atol=2e-5, rtol=0)
    assert forward.hidden.shape == (2 * n, first["completion_ids"].shape[1] + 1, model.config.hidden_size)


def test_no_grad_chunks_concatenate_any_output(tiny):
    model, tokenizer = tiny
    prompts, completions = sequences(tokenizer)
    batch = {**pack_completions(prompts, completions, tokenizer.pad_token_id), "scalar": torch.tensor(3.0)}
    model.train()
    try:
        whole, _ = completion_logprobs(model, batch)
        parts = no_grad_chunks(
            lambda part: {
                "logp": completion_logprobs(model, part)[0],
                "both": (part["scalar"] + 0 * part["prompt_mask"], None),
            },
            batch,
            rows=2,
        )
    finally:
        model.eval()
    assert not parts["logp"].requires_grad and parts["logp"].device.type == "cpu"
    torch.testing.assert_close(parts["logp"], whole.detach(), atol=1e-6, rtol=0)
    assert parts["both"][0].shape == batch["prompt_mask"].shape and parts["both"][1] is None


def test_answer_scorer_and_spans_equal_full_logits_with_an_explicit_eos_rule(tiny):
    model, tokenizer = tiny
    template = PlainTemplate()
    prompt, trace = encode(tokenizer, "Q:12+30\nT:"), encode(tokenizer, "2+0=2,1+3=4")
    layouts = [
        answer_layout(template, tokenizer, prompt, trace, "42", score_eos=False),
        answer_layout(template, tokenizer, prompt, trace[:3], "4", score_eos=True),
    ]
    assert layouts[1].ids[-1] == tokenizer.eos_token_id and layouts[0].ids[-1] != tokenizer.eos_token_id
    with torch.no_grad():
        scored = answer_logprobs(model, layouts, pad_id=tokenizer.pad_token_id, batch_size=1, with_trace=True)
        for i, s in enumerate(layouts):
            ids = s.ids
            want = reference(model, ids[: s.trace_start], ids[s.trace_start :], Warpers())[0]
            k = s.answer_start - s.trace_start
            span = scored.answer[i][scored.answer_mask[i]]
            torch.testing.assert_close(span, want[k:], atol=2e-5, rtol=0)
            assert scored.trace[i].item() == pytest.approx(want[:k].sum().item(), abs=1e-4)
            assert scored.trace_length[i] == k
        spans = span_token_logprobs(model, [s.ids for s in layouts], [s.answer_start for s in layouts])
        for span, row, mask in zip(spans, scored.answer, scored.answer_mask):
            torch.testing.assert_close(span, row[mask], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="span start"):
        span_token_logprobs(model, [[1, 2]], [0])


def test_warpers_of_a_sampling_and_bad_values():
    assert Warpers.of(Sampling(temperature=0.0)) == Warpers()  # greedy: scored at temperature 1
    assert Warpers.of(Sampling(temperature=0.7, top_k=5, top_p=0.9)) == Warpers(0.7, 5, 0.9)
    assert Warpers.of(Sampling(temperature=0.7, top_k=5), top_k_top_p=False) == Warpers(0.7)
    with pytest.raises(ValueError, match="temperature"):
        Warpers(0.0)
    with pytest.raises(ValueError, match="top_p"):
        Warpers(1.0, top_p=0.0)
