"""Math answer grading: math-verify's own extraction and comparison, with exact cheap paths.

`grade(response, gold)` reads the final answer from the response's last 4000 characters:

1. the last `\\boxed{…}` (`\\fbox{…}` and `\\boxed x` count as boxed; boxes close together or
   joined by "and"/","/"or" are one list, as math-verify reads them);
2. else a GSM8K `#### N` line;
3. else math-verify's extraction (`parse` with `LatexExtractionConfig(boxed_match_priority=0)` and
   `ExprExtractionConfig`): "final answer is …", then "answer: …" / "answer is …", then the last
   LaTeX expression or plain number/expression, whichever ends last (so "$\\frac72$ after 2 rolls"
   reads 2; LaTeX answers joined by ", " / "and" are one list).

Before that the text is made readable to math-verify: a sentence's full stop inside a math span
(`$x = 5.$`, which makes its LaTeX parser fail) is dropped, an `align`-like block becomes its last
row (`&= p - q`), `\\fbox` and `\\boxed 5` become `\\boxed{…}`, a Unicode minus becomes `-`.

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
import threading
from fractions import Fraction
from functools import lru_cache
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException
from sympy import Basic, MatrixBase, Pow, binomial, factorial, preorder_traversal

MAX_RESPONSE_CHARS = 4000  # the final answer lives at the end; the rest only costs time
MAX_ANSWER_CHARS = 300
TIMEOUT_SECONDS = 3
MAX_DIGITS = 10_000  # sympy builds larger exact numbers in C: seconds to beyond any timeout

# One configuration for gold and prediction: math-verify caches the compiled regexes of one config only.
_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

_HASHES = re.compile(r"####\s*([^\n]+)")
_FINAL_ANSWER_IS = re.compile(r"final answer is", re.IGNORECASE)  # math-verify's other priority-0 rule
_FBOX = re.compile(r"\\fbox\s*\{")
_BOXED_TOKEN = re.compile(r"\\boxed[ \t]+([^\s{$\\][^\s$]*)")  # `\boxed 5` -> `\boxed{5}`

# Math spans, to drop the sentence's full stop inside them ("$x = 5.$"), which makes math-verify's
# LaTeX parser fail on the span and fall back to some other number.
_MATH_SPAN = re.compile(
    r"(?<!\\)(\$\$)(.+?)(?<!\\)\$\$|(?<!\\)(\$)((?:\\\$|[^\n$])+?)(?<!\\)\$|(\\\[)(.+?)\\\]|(\\\()(.+?)\\\)",
    re.DOTALL,
)
# Multi-line environments, which math-verify does not read: their last row is the result.
_ROWS_ENV = re.compile(
    r"\\begin\{(align|aligned|alignat|eqnarray|gather|gathered|equation|split|multline)(\*?)\}(?:\{\d+\})?(.*?)\\end\{\1\2\}",
    re.DOTALL,
)
_INSIDE_MATH_ENVS = ("aligned", "gathered", "split")  # these sit inside $$ … $$ or \[ … \]
_ROW_LEAD = re.compile(r"^(?:\s|&|\\(?:Rightarrow|Longrightarrow|implies|therefore|q?quad)\b|=)*")
_ROW_TAGS = re.compile(r"\\(?:nonumber|notag)\b|\\tag\{[^{}]*\}|&")
_CLOSERS = {"$$": "$$", "$": "$", "\\[": "\\]", "\\(": "\\)"}

_SIGN = r"[-+]?"
_SEPARATOR = r"(?:,|\{,\}|\\,|\\ |\\;|\\:|~| )"
_GROUPED = re.compile(rf"{_SIGN}\d{{1,3}}(?:{_SEPARATOR}\d{{3}})+(?:\.\d+)?")
_PLAIN = re.compile(rf"{_SIGN}(?:\d+\.?\d*|\.\d+)")
_DECIMAL_COMMA = re.compile(rf"{_SIGN}\d+,\d+")
_ASSIGNED = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")  # "x = 5", "k_1 = 5"
_UNIT = re.compile(r"\s*\\(?:text|mbox|mathrm)\s*\{[^{}]*\}\s*$")
_SPACE_COMMANDS = re.compile(r"\\[,;:! ]|\\q?quad")

_LETTER_COMMANDS = re.compile(r"\\(?:text(?:bf|rm|it)?|math(?:rm|bf|tt)|mbox)(?![A-Za-z])\s*")
_LETTER = re.compile(r"\(([A-Ea-e])\)[.:]?|([A-E])[.:]?")
_LETTER_THEN_VALUE = re.compile(r"\(([A-E])\)[^-+*/^=].*")  # "(C) 12" (AMC style "\textbf{(C) }12")
_ANSWER_PHRASE = re.compile(
    r"(?i:answer)\W{0,3}(?:(?i:is|:)\s*)?(?:(?i:option|choice)\s*)?:?\s*"
    r"(\$[^$\n]{1,60}\$|\\\([^\n]{1,60}?\\\)|\*\*[^*\n]{1,30}\*\*|\([A-Ea-e]\)|[A-E]\b)"
)
_MATH_ENV = re.compile(r"\$([^$\n]{1,60})\$|\\\(([^\n]{1,60}?)\\\)")
_MARKED_LETTER = re.compile(
    r"(?i:option|choice)\s*\(?([A-E])\)?(?![A-Za-z])|\(([A-E])\)|\*\*\(?([A-E])\)?\*\*|^\s*\(?([A-E])\)?\.?\s*$",
    re.MULTILINE,
)


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
    j = i
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] != "{" and j > i:
        tail = text[j:].split("$", 1)[0].strip()
        return tail.split()[0] if tail else None
    if j >= len(text) or text[j] != "{":
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k]
    return None  # unbalanced


def _prepare(response: Any) -> str:
    """The response's tail, with the spellings math-verify's extraction misses made standard."""
    text = str(response)[-MAX_RESPONSE_CHARS:].replace("\u2212", "-")  # Unicode minus
    if "\\fbox" in text:
        text = _FBOX.sub(r"\\boxed{", text)
    if "\\boxed" in text:
        text = _BOXED_TOKEN.sub(r"\\boxed{\1}", text)
    if "\\begin" in text:
        text = _ROWS_ENV.sub(_last_row, text)
    return _MATH_SPAN.sub(_drop_full_stop, text)


def _last_row(match: re.Match) -> str:
    """`\\begin{align*} … &= p - q \\end{align*}` -> `\\[p - q\\]` (just `p - q` inside math)."""
    body = match.group(3)
    if "\\begin" in body:  # a matrix or cases inside: rows are not results
        return match.group(0)
    rows = [r for r in (_ROW_TAGS.sub("", row).strip() for row in body.split("\\\\")) if r]
    row = _ROW_LEAD.sub("", rows[-1]) if rows else ""
    return row if match.group(1) in _INSIDE_MATH_ENVS else f"\\[{row}\\]"


def _drop_full_stop(match: re.Match) -> str:
    groups = match.groups()
    i = next(k for k in (0, 2, 4, 6) if groups[k] is not None)
    opener, content = groups[i], groups[i + 1]
    stripped = content.rstrip()
    balanced = stripped.count("{") == stripped.count("}")  # else the `$` pairs are not math spans
    if balanced and stripped.endswith((".", ",", ";")) and not stripped.endswith(("\\.", "\\,", "\\;")):
        content = stripped[:-1]
    return opener + content + _CLOSERS[opener]


def _timeout() -> int | None:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=64)  # extract_answer and grade on one completion (evaluation) parse it once
def _parse(text: str) -> tuple[Any, ...]:
    """math-verify's extraction from `text`: (parsed, extracted LaTeX) or (extracted text,) or ()."""
    return tuple(parse(text, list(_EXTRACTION), parsing_timeout=_timeout()))


def _find_answer(text: str) -> tuple[str, tuple[Any, ...] | None, bool] | None:
    """The final answer of a prepared response, math-verify's parse of it (None: not parsed yet), and
    whether the cheap rules may judge that answer alone (not when math-verify may join several boxes)."""
    boxes = text.count("\\boxed")
    if boxes:
        content = last_boxed(text)
        if content is not None:
            single = boxes == 1 and not (_FINAL_ANSWER_IS.search(text) and "I hope" in text)
            return content.strip(), None, single
    else:
        hashes = _HASHES.findall(text)
        if hashes:
            return hashes[-1].strip(), None, True
    parsed = _parse(text)
    strings = [p for p in parsed if isinstance(p, str)]
    return (strings[-1].strip(), parsed, True) if strings else None


def extract_answer(response: str) -> str | None:
    """The final answer of a response as written (what `grade` compares), or None when there is none.

    The last boxed content, else the text after the last `####`, else the LaTeX or plain expression
    math-verify extracts ("the answer is $\\frac{10}{9}$." gives `\\frac{10}{9}`), else the option
    letter a response chose ("the answer is (C)." gives `C`).
    """
    try:
        text = _prepare(response)
        found = _find_answer(text)
        return found[0] if found is not None else _chosen_letter(text)
    except (Exception, TimeoutException):
        return None


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


def _letter(text: str, prefix_ok: bool = False) -> str | None:
    """The option letter `text` consists of (`E`, `(E)`, `\\text{(E)}`, `**E**`), else None."""
    s = re.sub(r"[\s{}$*]|\\[,;:! ]", "", _LETTER_COMMANDS.sub("", text))
    match = _LETTER.fullmatch(s) or (_LETTER_THEN_VALUE.fullmatch(s) if prefix_ok else None)
    if match is None:
        return None
    return next(g for g in match.groups() if g).upper()


def answer_letter(response: str) -> str | None:
    """The option letter (A–E) a response chose, else None.

    Its last box decides when it has one (None if the box holds something else), then the last
    "answer is X" / "answer: (X)" phrase (None if X is not a letter); without either, the last math
    expression that is a letter (`$\\text{(E)}$`), or "option X", "(X)", "**X**" or a line "X."
    """
    try:
        return _chosen_letter(_prepare(response))
    except Exception:
        return None


def _chosen_letter(text: str) -> str | None:
    """`answer_letter` of a prepared response."""
    boxed = last_boxed(text)
    if boxed is not None:
        return _letter(boxed, prefix_ok=True)
    end = text[-600:]
    phrases = _ANSWER_PHRASE.findall(end)
    if phrases:
        return _letter(phrases[-1], prefix_ok=True)
    for match in reversed(list(_MATH_ENV.finditer(end))):
        letter = _letter(match.group(1) or match.group(2) or "")
        if letter is not None:
            return letter
    marked = _MARKED_LETTER.findall(end)
    return next(g for g in marked[-1] if g) if marked else None


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
    return tuple(_bounded(parse(f"${gold}$", list(_EXTRACTION), parsing_timeout=_timeout())))


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
        text = _prepare(response)
        gold_letter = _letter(gold_text)
        if gold_letter is not None:
            chosen = _chosen_letter(text)
            if chosen is not None:
                return chosen == gold_letter
        found = _find_answer(text)
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
            parsed = _parse(text) if "\\boxed" in text else _parse(answer)
        gold_parsed, predicted = _parse_gold(gold_text), _bounded(parsed)
        if not gold_parsed or not predicted:
            return False
        return bool(verify(list(gold_parsed), predicted, timeout_seconds=_timeout()))
    except (Exception, TimeoutException):
        return False


def math_reward(prompts: list, completions: list, answer: list, **kwargs: Any) -> list[float]:
    """TRL-style reward: 1.0 when the completion's final answer equals the reference answer."""
    from reasoning.rewards.verifier import completion_text

    return [float(grade(completion_text(c), str(a))) for c, a in zip(completions, answer)]
