"""Evaluation metrics over n samples per problem: avg@k, unbiased pass@k, maj@k; and the diversity of
one problem's samples (`distinct_correct`, `pairwise_diversity`)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021).

    1 − C(n−c, k)/C(n, k), computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i); 1.0 when n − c < k.
    """
    if n < 0 or c < 0 or k < 0:
        raise ValueError(f"pass_at_k needs non-negative n, c, k; got n={n}, c={c}, k={k}")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} correct samples cannot exceed n={n}")
    if k > n or k == 0:
        raise ValueError(f"pass_at_k: k={k} must be between 1 and n={n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def avg_at_k(correct: Sequence[bool]) -> float:
    """Mean accuracy over the samples of one problem (avg@k with k = len(correct))."""
    if not correct:
        raise ValueError("avg_at_k needs at least one sample")
    return sum(bool(c) for c in correct) / len(correct)


def answer_key(answer: str) -> str:
    """The form in which answers are compared and counted (whitespace removed)."""
    return "".join(str(answer).split())


def maj_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    k: int | None = None,
    key: Callable[[str], str] = answer_key,
) -> float:
    """Majority vote over the first k samples: 1.0 if the most frequent answer is correct.

    Unparseable answers (None) do not vote; with no votes the result is 0.0. Ties are broken by
    the answer that appears first among the samples. The vote is correct when a sample carrying
    the winning answer was graded correct.
    """
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(correct)} grades")
    k = len(answers) if k is None else k
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k: k={k} must be between 1 and {len(answers)}")
    counts: dict[str, int] = {}
    first_index: dict[str, int] = {}
    graded: dict[str, bool] = {}
    for i in range(k):
        if answers[i] is None:
            continue
        label = key(answers[i])
        counts[label] = counts.get(label, 0) + 1
        first_index.setdefault(label, i)
        graded[label] = graded.get(label, False) or bool(correct[i])
    if not counts:
        return 0.0
    winner = min(counts, key=lambda label: (-counts[label], first_index[label]))
    return float(graded[winner])


def summarize(per_problem: list[list[bool]], ks: Sequence[int] = (1,)) -> dict[str, float]:
    """avg@n and pass@k (for each k ≤ n) averaged over problems with n samples each."""
    if not per_problem:
        raise ValueError("summarize needs at least one problem")
    n = min(len(c) for c in per_problem)
    out = {f"avg@{n}": sum(avg_at_k(c) for c in per_problem) / len(per_problem)}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(len(c), sum(c), k) for c in per_problem) / len(per_problem)
    return out


def distinct_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> int:
    """Number of distinct answers (by `answer_key`) among the correct samples of one problem."""
    return len({answer_key(a) for a, ok in zip(answers, correct) if ok and a is not None})


def pairwise_diversity(texts: Sequence[str]) -> float:
    """1 − mean pairwise similarity of the texts (difflib ratio, 1 = identical); 0 with fewer than 2.

    A character-level stand-in for the methods file's sentence-embedding cosine similarity (no
    embedding model is available offline); 0 means all samples are identical.
    """
    if len(texts) < 2:
        return 0.0
    total, pairs = 0.0, 0
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            total += difflib.SequenceMatcher(None, texts[i], texts[j], autojunk=False).ratio()
            pairs += 1
    return 1.0 - total / pairs
