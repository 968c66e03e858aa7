"""Math answer grading: extract the final answer, compare with math-verify.

`grade(response, gold)`: the last `\\boxed{…}` (or `\\fbox{…}`) of the response, else a GSM8K
`#### N` line, else the expression after "answer is", else the last number; then a plain numeric
comparison, then math-verify's symbolic equivalence (`verify(gold, prediction)`: argument order
matters). Never raises; long inputs are cut to their tail; math-verify's timeouts apply in the
main thread (they use signals) and input size bounds the time elsewhere.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from math_verify import parse, verify

MAX_RESPONSE_CHARS = 4000  # the final answer lives at the end; the rest only costs time
MAX_ANSWER_CHARS = 300
TIMEOUT_SECONDS = 3

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*[:\s]*\$?([^\n$]+?)\$?\s*(?:\.\s*$|\.\s|$|\n)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` / `\\fbox{…}` with balanced braces (or `\\boxed x`), else None."""
    best = None
    for command in ("\\boxed", "\\fbox"):
        start = text.rfind(command)
        if start >= 0 and (best is None or start > best[0]):
            best = (start, command)
    if best is None:
        return None
    i = best[0] + len(best[1])
    if i < len(text) and text[i] == " ":
        tail = text[i + 1 :].split("$", 1)[0].strip()
        return tail.split()[0] if tail else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced


def extract_answer(response: str) -> str | None:
    """The final answer string of a response, or None when nothing answer-like is found."""
    try:
        text = str(response)[-MAX_RESPONSE_CHARS:]
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed.strip()
        hashes = _HASHES.findall(text)
        if hashes:
            return hashes[-1].strip()
        stated = _ANSWER_IS.findall(text)
        if stated:
            return stated[-1].strip()
        numbers = re.findall(_NUMBER, text)
        return numbers[-1] if numbers else None
    except Exception:
        return None


def _as_number(text: str) -> float | None:
    cleaned = text.strip().strip("$").replace("\\!", "").replace("{,}", "").replace(",", "").strip()
    cleaned = cleaned.removeprefix("\\$").removesuffix("\\%").removesuffix("%").strip()
    if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", cleaned):
        return float(cleaned)
    return None


def _timeout() -> int | None:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def _parse(text: str) -> list[Any]:
    return parse(f"${text}$", parsing_timeout=_timeout())


def grade(response: str, gold: str) -> bool:
    """Whether the response's final answer equals `gold` (numerically or by math-verify)."""
    try:
        predicted = extract_answer(response)
        if predicted is None:
            return False
        gold_text = str(gold).strip()
        gold_boxed = last_boxed(gold_text)
        if gold_boxed is not None:
            gold_text = gold_boxed
        predicted, gold_text = predicted[:MAX_ANSWER_CHARS], gold_text[:MAX_ANSWER_CHARS]
        a, b = _as_number(predicted), _as_number(gold_text)
        if a is not None and b is not None:
            return abs(a - b) <= 1e-6 * max(1.0, abs(b))
        if _normalise(predicted) == _normalise(gold_text):
            return True
        gold_parsed, predicted_parsed = _parse(gold_text), _parse(predicted)
        if not gold_parsed or not predicted_parsed:
            return False
        return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=_timeout()))
    except Exception:
        return False


def _normalise(text: str) -> str:
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("dfrac", "frac")
    return "".join(text.split()).strip("$.").lower()


def math_reward(prompts: list, completions: list, answer: list, **kwargs: Any) -> list[float]:
    """TRL-style reward: 1.0 when the completion's final answer equals the reference answer."""
    from reasoning.rewards.verifier import completion_text

    return [float(grade(completion_text(c), str(a))) for c, a in zip(completions, answer)]
