"""Per-token log-probabilities and entropies, computed without full-vocabulary logits for a batch.

Alignment: for a sequence `ids [B, L]` with final hidden states `hidden [B, L, H]`, the
log-probability of token `ids[:, t]` uses `hidden[:, t - 1]`. Callers pass the hidden states
already aligned with their targets.

Sampling warpers: every function here scores the distribution a sampler draws from, softmax of the
logits divided by the temperature τ and then restricted to the top-k tokens and to the top-p
nucleus (`warp_logits`, transformers' Temperature → TopK → TopP warpers, in that order), so that
importance ratios π_θ/π_old against warped samples are exact.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask over `dim` (all elements when None)."""
    product = x * mask.to(x.dtype)
    return product.sum() if dim is None else product.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask / Σ mask over `dim` (all elements when None); 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1)


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`logits [..., V]` (already divided by τ) with the tokens outside the top k and outside the top-p
    nucleus set to −inf; `top_k` 0 and `top_p` 1 keep everything.

    As transformers' `TopKLogitsWarper` then `TopPLogitsWarper` (min_tokens_to_keep 1): top-k keeps
    the tokens whose logit is ≥ the k-th largest (ties kept); top-p sorts ascending and removes the
    tokens whose cumulative probability is ≤ 1 − p, keeping at least the most probable one.
    """
    if top_k:
        k = min(max(int(top_k), 1), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        flat = logits.reshape(-1, logits.shape[-1])
        ordered, order = torch.sort(flat, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False
        remove = remove.scatter(1, order, remove)
        logits = flat.masked_fill(remove, -torch.inf).view_as(logits)
    return logits


def warp_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """fp32 `logits [..., V]` / τ, then `top_k_top_p_filter`: the logits of the sampling distribution."""
    return top_k_top_p_filter(logits.float() / temperature, top_k, top_p)


def _entropy(logits: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """H = log Σ exp ℓ − Σ_v p_v ℓ_v for logits with −inf entries (filtered tokens: p = 0, no term)."""
    probs = torch.softmax(logits, dim=-1)
    return normaliser - torch.where(probs > 0, probs * logits, torch.zeros_like(logits)).sum(dim=-1)


def token_logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """`logits [B, T, V]`, `targets [B, T]` -> log softmax(warp(logits))[target]  `[B, T]` (the naive form)."""
    logits = warp_logits(logits, temperature, top_k, top_p)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """`logits [B, T, V]` -> H(softmax(warp(logits))) = logsumexp(ℓ) − Σ_v p_v ℓ_v  `[B, T]`."""
    if top_k or top_p < 1.0:
        logits = warp_logits(logits, temperature, top_k, top_p)
        return _entropy(logits, torch.logsumexp(logits, dim=-1))
    logits = logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def _chunk_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    # fp32 even under a caller's bf16 autocast (which would otherwise run this matmul in bf16)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = hidden.float() @ weight.float().t()
    # in place: one [chunk, V] buffer fewer each (the matmul's backward does not need its output)
    if bias is not None:
        logits.add_(bias.float())
    logits.div_(temperature)
    warped = bool(top_k) or top_p < 1.0
    if warped:
        logits = top_k_top_p_filter(logits, top_k, top_p)
    normaliser = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
    if with_entropy and warped:
        entropy = _entropy(logits, normaliser)
    elif with_entropy:
        probs = torch.softmax(logits, dim=-1)
        entropy = normaliser - (probs * logits).sum(dim=-1)
    else:
        entropy = torch.zeros_like(logp)
    return logp, entropy


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    max_chunk_elements: int = 2**24,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs and entropies from hidden states and the LM head, chunk by chunk.

    `hidden [B, T, H]`, `weight [V, H]`, `targets [B, T]` ->
    `logp [B, T]` = log softmax((h·Wᵀ + b)/τ)[target] and, with `with_entropy`, `entropy [B, T]`
    = H(softmax((h·Wᵀ + b)/τ)), the logits restricted to the top-k / top-p tokens when those are set. The B·T rows are processed `chunk_size` at a time under
    activation checkpointing, so only one chunk's logits [chunk, V] exist at once, in the
    forward and in the backward pass; a chunk is cut further to at most `max_chunk_elements`
    logits (64 MB in fp32: 110 rows at a vocabulary of 151,936), so that large vocabularies stay
    within a fixed budget. Accumulation is in fp32 whatever the input dtype or autocast state.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score tokens, got {temperature}")
    batch, length = targets.shape
    flat_hidden = hidden.reshape(batch * length, hidden.shape[-1])
    flat_targets = targets.reshape(batch * length)
    needs_grad = torch.is_grad_enabled() and (
        flat_hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    chunk_size = max(1, min(chunk_size, max_chunk_elements // weight.shape[0]))
    logps, entropies = [], []
    for start in range(0, batch * length, chunk_size):
        rows = slice(start, start + chunk_size)
        args = (flat_hidden[rows], weight, bias, flat_targets[rows], temperature, with_entropy, top_k, top_p)
        if needs_grad:
            logp, entropy = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(*args)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps).view(batch, length) if logps else flat_hidden.new_zeros(batch, length).float()
    if not with_entropy:
        return logp, None
    entropy = torch.cat(entropies).view(batch, length) if entropies else torch.zeros_like(logp)
    return logp, entropy
