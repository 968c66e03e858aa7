"""Length rewards (TRL-style callables): DAPO's soft overlong punishment.

Yu et al. 2025 (DAPO), Eq. 13: with the longest allowed completion L_max and a soft punishment
cache L_cache, a completion y of |y| tokens gets

    R(y) = 0                                   if |y| ≤ L_max − L_cache
         = ((L_max − L_cache) − |y|) / L_cache  if L_max − L_cache < |y| ≤ L_max
         = −1                                  if |y| > L_max

added to its task reward: a completion is punished more the deeper it runs into the last L_cache
tokens, and reaching L_max (a completion cut at max_tokens has |y| = L_max) costs −1. DAPO pairs it
with overlong filtering, which is `mask_truncated_completions` here. TRL 1.16 has the same function
(`trl.rewards.get_soft_overlong_punishment(max_completion_len, soft_punish_cache)`); ours takes the
same two parameters under the same names and computes the same values; it is logged as
`rewards/soft_overlong_punishment/...` (TRL's function is named `soft_overlong_punishment_reward`).
"""

from __future__ import annotations

from typing import Any


def soft_overlong_penalty(length: int, max_completion_len: int, soft_punish_cache: int) -> float:
    """R(|y|) of DAPO Eq. 13 for a completion of `length` tokens (0, a linear ramp to −1, then −1)."""
    start = max_completion_len - soft_punish_cache
    if length <= start:
        return 0.0
    if length <= max_completion_len:
        return (start - length) / soft_punish_cache
    return -1.0


class SoftOverlongPunishment:
    """TRL-style reward function `f(completion_ids=..., **kwargs) -> list[float]` of DAPO Eq. 13.

    `|y|` is `len(completion_ids)`: the generated tokens, including the stop token when the
    completion ended on one (what counts against the engine's max_tokens). A class rather than a
    closure so that it pickles (data-parallel workers, TRL's async rollouts).
    """

    __name__ = "soft_overlong_punishment"

    def __init__(self, max_completion_len: int, soft_punish_cache: int) -> None:
        if max_completion_len < 1:
            raise ValueError(f"max_completion_len (L_max) must be at least 1, got {max_completion_len}")
        if not 0 <= soft_punish_cache <= max_completion_len:
            raise ValueError(
                f"soft_punish_cache (L_cache) must be in [0, max_completion_len={max_completion_len}], "
                f"got {soft_punish_cache}"
            )
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache

    def __call__(self, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        return [
            soft_overlong_penalty(len(ids), self.max_completion_len, self.soft_punish_cache)
            for ids in completion_ids
        ]

    def __repr__(self) -> str:
        return (
            f"SoftOverlongPunishment(max_completion_len={self.max_completion_len}, "
            f"soft_punish_cache={self.soft_punish_cache})"
        )
