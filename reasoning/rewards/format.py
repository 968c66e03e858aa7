"""Format rewards (TRL-style callables): does the completion state its answer where it should?"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reasoning.rewards.math import last_boxed
from reasoning.rewards.verifier import completion_text


def boxed_format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1.0 when the completion contains a non-empty `\\boxed{…}` answer."""
    return [float(bool((last_boxed(completion_text(c)[-4000:]) or "").strip())) for c in completions]


def tagged_answer_format_reward(marker: str = "\nA:") -> Callable[..., list[float]]:
    """Reward 1.0 when the completion has `marker` followed by a non-empty answer line (plain template)."""

    def answer_format(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        scores = []
        for completion in completions:
            text = completion_text(completion)
            cut = text.rfind(marker)
            answer = text[cut + len(marker) :].split("\n", 1)[0].strip() if cut >= 0 else ""
            scores.append(float(bool(answer)))
        return scores

    answer_format.__name__ = "answer_format"
    return answer_format
