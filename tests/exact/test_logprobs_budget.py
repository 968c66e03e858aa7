"""Chunked log-probs stay fp32 under a bf16 autocast and keep each chunk within the logit budget."""

import torch

import reasoning.objectives.logprobs as logprobs
from reasoning.objectives.logprobs import token_logprobs_from_hidden, token_logprobs_from_logits


def inputs(batch=3, length=7, hidden=16, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=generator)
    w = torch.randn(vocab, hidden, generator=generator)
    targets = torch.randint(0, vocab, (batch, length), generator=generator)
    return h, w, targets


def test_bf16_autocast_does_not_lower_the_head_precision():
    h, w, targets = inputs()
    exact = token_logprobs_from_logits(h.double() @ w.double().t(), targets).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, entropy = token_logprobs_from_hidden(h, w, targets, with_entropy=True)
        # what the head would give if autocast applied to it: bf16 matmul, errors ~1e-2
        lowered = token_logprobs_from_logits(h @ w.t(), targets)
    assert inside.dtype == torch.float32 and entropy.dtype == torch.float32
    assert torch.allclose(inside, exact, atol=1e-5), (inside - exact).abs().max()
    assert (lowered - exact).abs().max() > 1e-3  # the check above can fail


def test_chunks_are_cut_to_the_element_budget_with_identical_values_and_gradients(monkeypatch):
    h, w, targets = inputs(vocab=50)
    h.requires_grad_(True)
    w.requires_grad_(True)
    reference, _ = token_logprobs_from_hidden(h, w, targets, chunk_size=1024)
    reference.sum().backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad, w.grad = None, None

    rows = []
    original = logprobs._chunk_logprobs

    def recording(hidden, *args):
        rows.append(hidden.shape[0])
        return original(hidden, *args)

    monkeypatch.setattr(logprobs, "_chunk_logprobs", recording)
    # 200 logits = 4 rows of a 50-token vocabulary per chunk, whatever chunk_size says
    budgeted, _ = token_logprobs_from_hidden(h, w, targets, chunk_size=1024, max_chunk_elements=200)
    assert rows[: (21 + 3) // 4] == [4, 4, 4, 4, 4, 1]  # 3 × 7 = 21 rows, forward pass
    budgeted.sum().backward()
    assert torch.equal(budgeted, reference)
    assert torch.allclose(h.grad, grads[0], atol=1e-6) and torch.allclose(w.grad, grads[1], atol=1e-6)
