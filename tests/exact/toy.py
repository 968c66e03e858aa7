"""A toy autoregressive policy whose support can be listed: every sequence of length 3 over 3 tokens."""

import itertools

import torch

VOCAB = 3
LENGTH = 3
SEQUENCES = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))  # [27, 3]


def prefix_index(sequences: torch.Tensor) -> torch.Tensor:
    """Index of the prefix before each position: 0 for the empty prefix, then 1.., [N, T]."""
    index = torch.zeros_like(sequences)
    offset, code = 1, torch.zeros(sequences.shape[0], dtype=torch.long)
    for t in range(1, sequences.shape[1]):
        code = code * VOCAB + sequences[:, t - 1]
        index[:, t] = offset + code
        offset += VOCAB**t
    return index


NUM_PREFIXES = sum(VOCAB**t for t in range(LENGTH))


def random_logits(seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(NUM_PREFIXES, VOCAB, generator=torch.Generator().manual_seed(seed))


def token_logprobs(logits: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """log π(x_t | x_<t) for each position: [N, T]."""
    logp = torch.log_softmax(logits, dim=-1)[prefix_index(sequences)]  # [N, T, V]
    return logp.gather(-1, sequences.unsqueeze(-1)).squeeze(-1)


def sample(logits: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    probs = token_logprobs(logits, SEQUENCES).sum(-1).exp()
    draws = torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return SEQUENCES[draws]
