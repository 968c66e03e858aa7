"""Evaluation metrics over n samples per problem: avg@k, unbiased pass@k, maj@k."""

from __future__ import annotations

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


def _normalise(answer: str) -> str:
    return "".join(str(answer).split())


def maj_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    k: int | None = None,
    key: Callable[[str], str] = _normalise,
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
