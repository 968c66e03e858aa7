"""pass@k equals brute-force enumeration; maj@k ties are broken as documented."""

import itertools
from math import comb

import pytest

from reasoning.eval.metrics import avg_at_k, maj_at_k, pass_at_k, summarize


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_over_all_k_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (
                    n,
                    c,
                    k,
                )


def test_pass_at_k_closed_form_on_larger_n():
    assert pass_at_k(64, 5, 8) == pytest.approx(1 - comb(59, 8) / comb(64, 8), rel=1e-12)
    assert pass_at_k(100, 0, 10) == 0.0
    assert pass_at_k(10, 3, 8) == 1.0  # n - c < k


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cannot exceed"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="between 1 and n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="non-negative"):
        pass_at_k(4, -1, 1)


def test_avg_at_k():
    assert avg_at_k([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        avg_at_k([])


def test_maj_at_k_majority_and_tie_break_by_first_appearance():
    # clear majority for a wrong answer
    assert maj_at_k(["3", "4", "4"], [True, False, False]) == 0.0
    # tie 1-1: the answer seen first wins
    assert maj_at_k(["5", "6"], [True, False]) == 1.0
    assert maj_at_k(["6", "5"], [False, True]) == 0.0
    # tie 2-2 with the correct one appearing second
    assert maj_at_k(["7", "8", "8", "7"], [False, True, True, False]) == 0.0
    # None does not vote; whitespace is normalised
    assert maj_at_k([None, None, "1 2", "12"], [False, False, True, True]) == 1.0
    assert maj_at_k([None, None], [False, False]) == 0.0
    # only the first k samples vote
    assert maj_at_k(["1", "2", "2"], [True, False, False], k=1) == 1.0


def test_summarize():
    out = summarize([[True, False], [False, False]], ks=(1, 2, 4))
    assert out["avg@2"] == 0.25
    assert out["pass@1"] == 0.25 and out["pass@2"] == 0.5
    assert "pass@4" not in out
