"""Math answer grading: math-verify's own extraction and comparison, with exact cheap paths.

`grade(response, gold)` reads the response's final answer as `reasoning.data.answers` does (the
last `\\boxed{…}`, else a GSM8K `#### N` line, else math-verify's extraction, from the response's
last 4000 characters made readable to math-verify; see that module) and compares it with the gold.

The gold is its own last `\\boxed{}` if it has one, read as LaTeX (`$gold$`). The comparison is
math-verify's `verify(gold, prediction)` (order matters: a prediction `k = \\frac13` matches gold
`\\frac13`; `5 \\leq x` matches `x \\geq 5`, `y = -\\frac12x+\\frac34` matches `2x+4y-3=0`;
`\\dfrac`, `\\left(…\\right)`, units in `\\text{}`, `\\sqrt3`, sets, intervals and matrices are
normalised by it), preceded by three exact rules for what math-verify cannot do or does slowly:

- Option letters. A gold `E`, `(E)` or `\\text{(E)}` is compared with the letter the response
  chose (`answer_letter`: its box, "the answer is (E)", `$\\text{E}$`, "**E**").
- Plain numbers. When both answers are plain numbers they are compared exactly (fractions): the
  verdict math-verify gives, without its LaTeX parser (~25 ms an answer); differences below its
  6-decimal rounding are left to it. Digit grouping: a comma, space, `\\,`, `~` or `{,}` between
  groups of exactly three digits is a thousands separator (`1,000` = `1 000` = `1\\,000` = 1000);
  any other comma between digits (`1000,99`, `0,5`) is a decimal comma when the gold is a single
  number, and a list separator (`1,2` = {1, 2}) otherwise.
- Identical answers (ignoring spaces, `\\left`/`\\right`, `\\dfrac`) are equal.

Never raises; answers longer than MAX_ANSWER_CHARS are only compared as text. math-verify's
timeouts apply in the main thread (they use signals); elsewhere input size bounds the time, and
numbers too large to build exactly (`10^{10^{10}}`, `10^6!`, which no signal can interrupt) are
compared as text only.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from functools import lru_cache
from typing import Any

from math_verify import parse, verify
from math_verify.errors import TimeoutException
from sympy import Basic, MatrixBase, Pow, binomial, factorial, preorder_traversal

from reasoning.data.answers import (
    EXTRACTION,
    answer_letter,
    chosen_letter,
    completion_text,
    extract_answer,
    find_answer,
    last_boxed,
    math_verify_timeout,
    option_letter,
    parse_response,
    prepare_response,
)

MAX_ANSWER_CHARS = 300
MAX_DIGITS = 10_000  # sympy builds larger exact numbers in C: seconds to beyond any timeout

_SIGN = r"[-+]?"
_SEPARATOR = r"(?:,|\{,\}|\\,|\\ |\\;|\\:|~| )"
_GROUPED = re.compile(rf"{_SIGN}\d{{1,3}}(?:{_SEPARATOR}\d{{3}})+(?:\.\d+)?")
_PLAIN = re.compile(rf"{_SIGN}(?:\d+\.?\d*|\.\d+)")
_DECIMAL_COMMA = re.compile(rf"{_SIGN}\d+,\d+")
_ASSIGNED = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")  # "x = 5", "k_1 = 5"
_UNIT = re.compile(r"\s*\\(?:text|mbox|mathrm)\s*\{[^{}]*\}\s*$")
_SPACE_COMMANDS = re.compile(r"\\[,;:! ]|\\q?quad")


def _number(text: str, answer: bool = False, decimal_comma: bool = False) -> Fraction | None:
    """The value of a plain number ("1,000", "\\$1\\,000", "12 \\text{ cm}", "5."), else None.

    An answer may also be an assignment ("k = 5"): math-verify matches it with a gold "5".
    """
    s = text.strip().strip("$").strip().replace("\\!", "")
    if answer:
        s = _ASSIGNED.sub("", s)
    s = _UNIT.sub("", s).removeprefix("\\$").strip().removesuffix(".").strip()
    if _GROUPED.fullmatch(s):
        return Fraction(re.sub(_SEPARATOR, "", s))
    if _PLAIN.fullmatch(s):
        return Fraction(s)
    if decimal_comma and _DECIMAL_COMMA.fullmatch(s):
        return Fraction(s.replace(",", "."))
    return None


def _squash(text: str) -> str:
    text = _SPACE_COMMANDS.sub("", text).replace("\\left", "").replace("\\right", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return "".join(text.split()).strip("$").removesuffix(".")


def _cheap_verdict(answer: str, gold: str) -> bool | None:
    """True/False where it is certain without math-verify's parser, None otherwise."""
    b = _number(gold)
    a = _number(answer, answer=True, decimal_comma=b is not None)
    if a is not None and b is not None:
        if a == b:
            return True
        return None if abs(a - b) < Fraction(1, 10**6) else False  # inside verify's 6-decimal rounding
    return True if _squash(answer) == _squash(gold) else None


def _too_large(expr: Any) -> bool:
    """Whether comparing `expr` could build an exact number of more than MAX_DIGITS digits."""
    if isinstance(expr, MatrixBase):
        return any(_too_large(e) for e in expr)
    if not isinstance(expr, Basic):
        return False
    for node in preorder_traversal(expr):
        try:
            if isinstance(node, Pow) and node.base.is_number and node.exp.is_number:
                exponent = abs(float(node.exp.evalf(5)))
                base = abs(complex(node.base.evalf(5)))
                if base > 1 and exponent * math.log10(base) > MAX_DIGITS:
                    return True
            elif isinstance(node, (factorial, binomial)) and node.args[0].is_number:
                if abs(float(node.args[0].evalf(5))) > MAX_DIGITS / 4:
                    return True
        except (TypeError, ValueError, OverflowError, ArithmeticError):
            return True  # e.g. an exponent beyond float range
    return False


def _bounded(parsed: tuple[Any, ...]) -> list[Any]:
    return [p for p in parsed if not _too_large(p)]


@lru_cache(maxsize=1024)  # RL groups grade many completions against one gold
def _parse_gold(gold: str) -> tuple[Any, ...]:
    return tuple(_bounded(parse(f"${gold}$", list(EXTRACTION), parsing_timeout=math_verify_timeout())))


def _gold_text(gold: Any) -> str:
    text = str(gold).strip().replace("\u2212", "-")
    boxed = last_boxed(text)
    return " ".join((boxed if boxed is not None else text).split())


def grade(response: str, gold: str) -> bool:
    """Whether the response's final answer equals `gold` (see the module docstring). Never raises."""
    return _grade(response, gold, cheap=True)


def _grade(response: str, gold: str, cheap: bool) -> bool:
    """`grade`; with `cheap=False` numbers and identical answers also go through math-verify (tests)."""
    try:
        gold_text = _gold_text(gold)
        if not gold_text:
            return False
        text = prepare_response(response)
        gold_letter = option_letter(gold_text)
        if gold_letter is not None:
            chosen = chosen_letter(text)
            if chosen is not None:
                return chosen == gold_letter
        found = find_answer(text)
        if found is None or not found[0]:
            return False  # no answer, or an empty box
        answer, parsed, alone = found
        if cheap and alone:
            verdict = _cheap_verdict(answer, gold_text)
            if verdict is not None:
                return verdict
        if len(answer) > MAX_ANSWER_CHARS or len(gold_text) > MAX_ANSWER_CHARS:
            return False
        if parsed is None:  # a box: math-verify's boxed extraction; a `####` line: that line
            parsed = parse_response(text) if "\\boxed" in text else parse_response(answer)
        gold_parsed, predicted = _parse_gold(gold_text), _bounded(parsed)
        if not gold_parsed or not predicted:
            return False
        return bool(verify(list(gold_parsed), predicted, timeout_seconds=math_verify_timeout()))
    except (Exception, TimeoutException):
        return False


def math_reward(prompts: list, completions: list, answer: list, **kwargs: Any) -> list[float]:
    """TRL-style reward: 1.0 when the completion's final answer equals the reference answer."""
    return [float(grade(completion_text(c), str(a))) for c, a in zip(completions, answer)]


__all__ = ["answer_letter", "extract_answer", "grade", "last_boxed", "math_reward"]
