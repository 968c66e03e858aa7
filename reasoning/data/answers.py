"""Reading the final answer out of a completion's text (a leaf module: no `reasoning` imports).

`extract_answer(response)` reads it from the response's last 4000 characters:

1. the last `\\boxed{…}` (`\\fbox{…}` and `\\boxed x` count as boxed; boxes close together or
   joined by "and"/","/"or" are one list, as math-verify reads them);
2. else a GSM8K `#### N` line;
3. else math-verify's extraction (`parse` with `LatexExtractionConfig(boxed_match_priority=0)` and
   `ExprExtractionConfig`): "final answer is …", then "answer: …" / "answer is …", then the last
   LaTeX expression or plain number/expression, whichever ends last (so "$\\frac72$ after 2 rolls"
   reads 2; LaTeX answers joined by ", " / "and" are one list);
4. else the option letter the response chose (`answer_letter`).

Before that the text is made readable to math-verify (`prepare_response`): a sentence's full stop
inside a math span (`$x = 5.$`, which makes its LaTeX parser fail) is dropped, an `align`-like block
becomes its last row (`&= p - q`), `\\fbox` and `\\boxed 5` become `\\boxed{…}`, a Unicode minus
becomes `-`. Comparing an answer with a gold one is `reasoning.rewards.math.grade`; templates use
this module to split completions, so it imports nothing of the package (no import cycle).
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
from math_verify.errors import TimeoutException

MAX_RESPONSE_CHARS = 4000  # the final answer lives at the end; the rest only costs time
TIMEOUT_SECONDS = 3

# One configuration for gold and prediction: math-verify caches the compiled regexes of one config only.
EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

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


def prepare_response(response: Any) -> str:
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


def math_verify_timeout() -> int | None:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=64)  # extract_answer and grade on one completion (evaluation) parse it once
def parse_response(text: str) -> tuple[Any, ...]:
    """math-verify's extraction from `text`: (parsed, extracted LaTeX) or (extracted text,) or ()."""
    return tuple(parse(text, list(EXTRACTION), parsing_timeout=math_verify_timeout()))


def find_answer(text: str) -> tuple[str, tuple[Any, ...] | None, bool] | None:
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
    parsed = parse_response(text)
    strings = [p for p in parsed if isinstance(p, str)]
    return (strings[-1].strip(), parsed, True) if strings else None


def extract_answer(response: str) -> str | None:
    """The final answer of a response as written (what `grade` compares), or None when there is none.

    The last boxed content, else the text after the last `####`, else the LaTeX or plain expression
    math-verify extracts ("the answer is $\\frac{10}{9}$." gives `\\frac{10}{9}`), else the option
    letter a response chose ("the answer is (C)." gives `C`).
    """
    try:
        text = prepare_response(response)
        found = find_answer(text)
        return found[0] if found is not None else chosen_letter(text)
    except (Exception, TimeoutException):
        return None


def option_letter(text: str, prefix_ok: bool = False) -> str | None:
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
        return chosen_letter(prepare_response(response))
    except Exception:
        return None


def chosen_letter(text: str) -> str | None:
    """`answer_letter` of a prepared response."""
    boxed = last_boxed(text)
    if boxed is not None:
        return option_letter(boxed, prefix_ok=True)
    end = text[-600:]
    phrases = _ANSWER_PHRASE.findall(end)
    if phrases:
        return option_letter(phrases[-1], prefix_ok=True)
    for match in reversed(list(_MATH_ENV.finditer(end))):
        letter = option_letter(match.group(1) or match.group(2) or "")
        if letter is not None:
            return letter
    marked = _MARKED_LETTER.findall(end)
    return next(g for g in marked[-1] if g) if marked else None


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes strings, or chat message lists for conversational data."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)
