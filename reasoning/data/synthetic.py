"""Embedded synthetic tasks: deterministic by seed, with reference traces and verifiers.

- `addition`: "347+285" -> trace "7+5=12,4+8+1=13,3+2+1=6" (one step per column from the units,
  `+c` for a carry-in) -> answer "632". `forget_carry=p` has a share p of the problems worked by a
  flawed teacher that never carries (warm-up data with a flaw the verifier, not the teacher, knows).
- `countdown`: "3 5 7->22" -> trace "3*5=15,15+7=22" -> answer "3*5+7"; every given number is
  used exactly once (`use_all`), with + − × ÷ and exact division. Many valid solutions.

Each problem falls in the held-out split or the training split by a hash of its question
(`split="test"` / `"train"`), so training data never contains an evaluation problem.
Verifiers never evaluate model text: countdown answers are parsed by a small recursive-descent
parser over digits, + − * / and parentheses.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any
from urllib.parse import parse_qsl

SPLITS = ("train", "test", "all")
HELD_OUT_BUCKETS = 10  # one question in ten is held out


def in_test_split(question: str) -> bool:
    """Held-out membership by a stable hash of the question (crc32, one bucket of ten)."""
    return zlib.crc32(question.encode()) % HELD_OUT_BUCKETS == 0


def _keep(question: str, split: str) -> bool:
    if split == "all":
        return True
    return in_test_split(question) == (split == "test")


@dataclass(frozen=True)
class Problem:
    """One task instance: question, reference trace, final answer, task-specific facts."""

    question: str
    trace: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def draw_problems(
    draw: Callable[[random.Random], Problem | None], n: int, seed: int, split: str, what: str
) -> list[Problem]:
    """`n` problems of `split` from `draw(rng)` (which may return None to reject), seeded."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(seed)
    problems: list[Problem] = []
    for _ in range(1000 * n + 1000):
        if len(problems) == n:
            return problems
        problem = draw(rng)
        if problem is not None and _keep(problem.question, split):
            problems.append(problem)
    if len(problems) == n:
        return problems
    raise ValueError(f"could not draw {n} {split} problems of {what}; relax the task settings")


@dataclass(frozen=True)
class AdditionTask:
    """Sum of two non-negative integers below 10^digits, with a digit-by-digit scratchpad.

    `forget_carry` makes a flawed teacher for warm-up data: that share of the problems is worked by
    a solver that never adds the carry (trace "7+5=12,4+8=12,8+2=10", answer read off it the same
    way, "1022" for 847+285). It changes the `trace` and `answer` columns only: the verifier grades
    the true sum, so a reward or an evaluation is unaffected.
    """

    digits: int = 3
    forget_carry: float = 0.0
    name: str = "addition"

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 30:
            raise ValueError(f"addition digits must be between 1 and 30, got {self.digits}")
        if not 0.0 <= self.forget_carry <= 1.0:
            raise ValueError(f"addition forget_carry is a probability in [0, 1], got {self.forget_carry}")

    def spec(self) -> str:
        return f"addition?digits={self.digits}"

    def solve(self, a: int, b: int, forget_carry: bool = False) -> Problem:
        """The column-by-column working of a + b (without carries when `forget_carry`)."""
        da, db = str(a).zfill(self.digits)[::-1], str(b).zfill(self.digits)[::-1]
        steps, carry, totals = [], 0, []
        for i in range(self.digits):
            x, y = int(da[i]), int(db[i])
            total = x + y + carry
            steps.append(f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}")
            totals.append(total)
            carry = 0 if forget_carry else total // 10
        # the answer is read off the trace: the last column's total, then the units of the others
        answer = str(int(str(totals[-1]) + "".join(str(t % 10) for t in reversed(totals[:-1]))))
        return Problem(f"{a}+{b}", ",".join(steps), answer, {"a": a, "b": b})

    def draw(self, rng: random.Random) -> Problem:
        a, b = rng.randrange(10**self.digits), rng.randrange(10**self.digits)
        # which solver works a question is a hash of it, so a seed draws the same questions for any share
        flawed = zlib.crc32(f"forget-carry:{a}+{b}".encode()) < self.forget_carry * 2**32
        return self.solve(a, b, forget_carry=flawed)

    def generate(self, n: int, seed: int = 0, split: str = "all") -> list[Problem]:
        return draw_problems(self.draw, n, seed, split, f"{self.digits}-digit addition")

    def verify(self, problem: Problem | dict, answer: str) -> bool:
        """The answer is the sum written as a plain non-negative integer."""
        try:
            question = problem.question if isinstance(problem, Problem) else problem["question"]
            a, b = (int(x) for x in question.split("+"))
            text = str(answer).strip()
            return text.isascii() and text.isdigit() and len(text) <= 40 and int(text) == a + b
        except Exception:
            return False


# ---------------------------------------------------------------------------------------------
# Countdown

OPERATORS = "+-*/"
MAX_EXPRESSION_LENGTH = 100


class _Parser:
    """expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*; factor := int | '(' expr ')'.

    Returns the exact value (Fraction) and the list of integer literals used.
    """

    def __init__(self, text: str) -> None:
        self.text = text.replace(" ", "")
        self.pos = 0
        self.numbers: list[int] = []

    def parse(self) -> Fraction:
        value = self.expression(0)
        if self.pos != len(self.text):
            raise ValueError(f"unexpected {self.text[self.pos]!r}")
        return value

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expression(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-") and self.peek():
            op = self.text[self.pos]
            self.pos += 1
            right = self.term(depth)
            value = value + right if op == "+" else value - right
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/") and self.peek():
            op = self.text[self.pos]
            self.pos += 1
            right = self.factor(depth)
            if op == "*":
                value = value * right
            else:
                if right == 0:
                    raise ZeroDivisionError
                value = value / right
        return value

    def factor(self, depth: int) -> Fraction:
        if depth > 20:
            raise ValueError("nesting too deep")
        char = self.peek()
        if char == "(":
            self.pos += 1
            value = self.expression(depth + 1)
            if self.peek() != ")":
                raise ValueError("missing )")
            self.pos += 1
            return value
        start = self.pos
        while self.peek().isdigit() and self.peek().isascii():
            self.pos += 1
        if start == self.pos or self.pos - start > 6:
            raise ValueError(f"expected a number at {start}")
        number = int(self.text[start : self.pos])
        self.numbers.append(number)
        return Fraction(number)


def evaluate_expression(text: str) -> tuple[Fraction, list[int]]:
    """Exact value and the numbers used of an arithmetic expression; ValueError when malformed."""
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise ValueError("expression too long")
    parser = _Parser(text)
    return parser.parse(), parser.numbers


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclass(frozen=True)
class _Node:
    text: str
    value: Fraction
    op: str  # "" for a number
    steps: tuple[str, ...]


def _combine(left: _Node, op: str, right: _Node) -> _Node | None:
    if op == "+":
        value = left.value + right.value
    elif op == "-":
        value = left.value - right.value
    elif op == "*":
        value = left.value * right.value
    else:
        if right.value == 0:
            return None
        value = left.value / right.value
    if value <= 0 or value.denominator != 1:
        return None  # positive integer intermediates only
    left_text = f"({left.text})" if left.op and _PRECEDENCE[left.op] < _PRECEDENCE[op] else left.text
    needs_parens = right.op and (
        _PRECEDENCE[right.op] < _PRECEDENCE[op] or (_PRECEDENCE[right.op] == _PRECEDENCE[op] and op in "-/")
    )
    right_text = f"({right.text})" if needs_parens else right.text
    step = f"{left.value}{op}{right.value}={value}"
    return _Node(f"{left_text}{op}{right_text}", value, op, left.steps + right.steps + (step,))


def _all_trees(nodes: tuple[_Node, ...]) -> list[_Node]:
    """Every expression using all `nodes` once (each combination order)."""
    if len(nodes) == 1:
        return [nodes[0]]
    results = []
    for i, j in itertools.permutations(range(len(nodes)), 2):
        rest = tuple(n for k, n in enumerate(nodes) if k not in (i, j))
        for op in OPERATORS:
            combined = _combine(nodes[i], op, nodes[j])
            if combined is not None:
                results.extend(_all_trees(rest + (combined,)))
    return results


def _leaves(numbers: list[int]) -> tuple[_Node, ...]:
    return tuple(_Node(str(x), Fraction(x), "", ()) for x in numbers)


@dataclass(frozen=True)
class CountdownTask:
    """Reach a target from given numbers with + − × ÷ (exact division, positive intermediates)."""

    n_numbers: int = 3
    max_number: int = 20
    max_target: int = 100
    use_all: bool = True
    name: str = "countdown"

    def __post_init__(self) -> None:
        if not 2 <= self.n_numbers <= 5:
            raise ValueError(f"countdown n_numbers must be between 2 and 5, got {self.n_numbers}")

    def spec(self) -> str:
        return (
            f"countdown?n_numbers={self.n_numbers}&max_number={self.max_number}"
            f"&max_target={self.max_target}&use_all={str(self.use_all).lower()}"
        )

    def _draw(self, rng: random.Random) -> Problem | None:
        numbers = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
        nodes = list(_leaves(numbers))
        while len(nodes) > 1:
            i, j = rng.sample(range(len(nodes)), 2)
            combined = _combine(nodes[i], rng.choice(OPERATORS), nodes[j])
            if combined is None:
                return None
            nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [combined]
        root = nodes[0]
        if not 1 <= root.value <= self.max_target:
            return None
        target = int(root.value)
        question = f"{' '.join(map(str, numbers))}->{target}"
        return Problem(question, ",".join(root.steps), root.text, {"numbers": numbers, "target": target})

    def generate(self, n: int, seed: int = 0, split: str = "all") -> list[Problem]:
        return draw_problems(self._draw, n, seed, split, f"countdown ({self.spec()})")

    @staticmethod
    def _parse_question(problem: Problem | dict) -> tuple[list[int], int]:
        question = problem.question if isinstance(problem, Problem) else problem["question"]
        left, target = question.split("->")
        return [int(x) for x in left.split()], int(target)

    def verify(self, problem: Problem | dict, answer: str) -> bool:
        """The expression evaluates exactly to the target using the given numbers (never executes text)."""
        try:
            numbers, target = self._parse_question(problem)
            value, used = evaluate_expression(str(answer).strip())
        except (ValueError, ZeroDivisionError, KeyError, AttributeError, TypeError):
            return False
        remaining = list(numbers)
        for number in used:
            if number not in remaining:
                return False
            remaining.remove(number)
        if self.use_all and remaining:
            return False
        return value == target

    def solutions(self, problem: Problem | dict) -> list[str]:
        """Every distinct expression (in the generator's formatting) that uses all numbers and hits the target."""
        numbers, target = self._parse_question(problem)
        found = {node.text for node in _all_trees(_leaves(numbers)) if node.value == target}
        return sorted(found)


TASKS: dict[str, type] = {"addition": AdditionTask, "countdown": CountdownTask}


def make_task(name: str, **kwargs: Any) -> AdditionTask | CountdownTask:
    """A task by name with keyword settings."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose one of {', '.join(TASKS)}")
    try:
        return TASKS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad settings for synthetic task {name!r}: {err}") from err


def _parse_value(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """ "addition?digits=3&n=100" -> ("addition", {"digits": 3, "n": 100})."""
    name, _, query = spec.partition("?")
    return name, {k: _parse_value(v) for k, v in parse_qsl(query, strict_parsing=bool(query))}


def task_from_spec(spec: str) -> AdditionTask | CountdownTask:
    """The task named by a spec like "countdown?n_numbers=4" (generation keys n/seed/split ignored)."""
    name, settings = parse_spec(spec)
    for key in ("n", "seed", "split"):
        settings.pop(key, None)
    return make_task(name, **settings)


def to_records(problems: list[Problem], task: AdditionTask | CountdownTask) -> list[dict[str, Any]]:
    """Rows with id, question, answer, solution (= trace), task (its spec) and the meta fields."""
    return [
        {
            "id": i,
            "question": p.question,
            "answer": p.answer,
            "solution": p.trace,
            "task": task.spec(),
            **{k: v for k, v in p.meta.items()},
        }
        for i, p in enumerate(problems)
    ]


def is_traced(question: str, share: float) -> bool:
    """Whether a question keeps its reference trace when only a `share` of them do (a stable hash)."""
    return zlib.crc32(f"traced:{question}".encode()) < share * 2**32


def records_from_spec(spec: str) -> list[dict[str, Any]]:
    """Records for "TASK?settings&n=N&seed=S&split=train|test|all" (defaults n=1000, seed=0, all).

    `traced=p` makes answers-only supervision: a share p of the questions (chosen by a hash of the
    question) keep their reference trace (`traced` True); the others carry only the question and its
    correct answer (`solution` ""; with `forget_carry`, the true sum rather than the flawed
    teacher's, since a flawed teacher is one that writes traces).
    """
    name, settings = parse_spec(spec)
    n = int(settings.pop("n", 1000))
    seed = int(settings.pop("seed", 0))
    split = str(settings.pop("split", "all"))
    traced = settings.pop("traced", None)
    task = make_task(name, **settings)
    records = to_records(task.generate(n, seed=seed, split=split), task)
    if traced is None:
        return records
    if not 0.0 <= float(traced) <= 1.0:
        raise ValueError(f"traced is the share of questions with a reference trace, in [0, 1]; got {traced}")
    for record in records:
        record["traced"] = is_traced(record["question"], float(traced))
        if not record["traced"]:
            record["solution"] = ""
            if isinstance(task, AdditionTask):
                record["answer"] = str(record["a"] + record["b"])
    return records
