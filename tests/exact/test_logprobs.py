"""Chunked log-probs from hidden states equal the naive full-logits computation."""

import pytest
import torch

from reasoning.objectives.logprobs import (
    entropy_from_logits,
    masked_mean,
    token_logprobs_from_hidden,
    token_logprobs_from_logits,
)


def inputs(seed=0, batch=3, length=7, hidden=16, vocab=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    b = torch.randn(vocab, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, length), generator=g)
    return h, w, b, targets


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_naive_values_entropy_and_gradients(chunk_size, temperature):
    h, w, b, targets = inputs()
    logits = h @ w.t() + b
    naive = token_logprobs_from_logits(logits, targets, temperature)
    naive_entropy = entropy_from_logits(logits, temperature)
    ours, entropy = token_logprobs_from_hidden(h, w, targets, b, temperature, chunk_size, with_entropy=True)
    assert torch.allclose(ours, naive, atol=1e-5) and torch.allclose(entropy, naive_entropy, atol=1e-5)
    weights = torch.randn(naive.shape, generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.grad(((naive + 0.1 * naive_entropy) * weights).sum(), (h, w, b))
    got = torch.autograd.grad(((ours + 0.1 * entropy) * weights).sum(), (h, w, b))
    for a, e in zip(got, expected):
        assert torch.allclose(a, e, atol=1e-5)


def test_log_softmax_reference_matches_torch():
    h, w, b, targets = inputs(2)
    logits = h @ w.t()
    manual = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs_from_logits(logits, targets), manual, atol=1e-6)


def test_bf16_inputs_close_to_fp32():
    h, w, b, targets = inputs(3)
    exact, _ = token_logprobs_from_hidden(h, w, targets, b)
    low, _ = token_logprobs_from_hidden(h.bfloat16(), w.bfloat16(), targets, b.bfloat16())
    assert low.dtype == torch.float32
    assert torch.allclose(low, exact, atol=0.15)


def test_no_grad_path_and_masked_mean():
    h, w, b, targets = inputs(4)
    with torch.no_grad():
        logp, entropy = token_logprobs_from_hidden(h, w, targets, chunk_size=2)
    assert entropy is None and not logp.requires_grad
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert masked_mean(x, mask) == pytest.approx(8 / 3)
    assert torch.allclose(masked_mean(x, mask, dim=1), torch.tensor([1.0, 3.5]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_from_hidden(h, w, targets, temperature=0)
