"""math-verify grading: reference solutions grade correct, substituted wrong answers grade wrong."""

import re
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reasoning.eval.benchmarks import load_benchmark
from reasoning.rewards.math import extract_answer, grade, last_boxed, math_reward


def wrong_answer(answer: str) -> str:
    """A guaranteed different answer: gold + 1 for numbers, `gold + 1` as an expression otherwise."""
    plain = answer.replace(",", "").strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", plain):
        return str(float(plain) + 1) if "." in plain else str(int(plain) + 1)
    return f"{answer}+1"


@pytest.mark.parametrize("name", ["gsm8k", "math500"])
def test_reference_solutions_grade_correct(name):
    records = load_benchmark(name)
    if name == "gsm8k":  # the rationale ends with its own "#### N" line in the source; rebuild it
        responses = [f"{r['solution']}\n#### {r['answer']}" for r in records]
    else:
        responses = [r["solution"] for r in records]
    failures = [
        (r["answer"], resp[-150:]) for r, resp in zip(records, responses) if not grade(resp, r["answer"])
    ]
    rate = 1 - len(failures) / len(records)
    print(f"{name}: {rate:.4f} of {len(records)} reference solutions graded correct")
    assert rate >= 0.99, failures[:10]


@pytest.mark.parametrize("name", ["gsm8k", "math500", "aime24", "amc23"])
def test_substituted_wrong_answers_grade_wrong(name):
    records = load_benchmark(name)
    accepted = [
        r["answer"]
        for r in records
        if grade(f"The answer is $\\boxed{{{wrong_answer(r['answer'])}}}$.", r["answer"])
    ]
    rate = 1 - len(accepted) / len(records)
    print(f"{name}: {rate:.4f} of substituted wrong answers graded wrong")
    assert rate >= 0.99, accepted[:10]


def _unboxed(solution: str, answer: str | None = None) -> str:
    """The solution with its last `\\boxed{X}` written as plain `X` (or as `answer`)."""
    content = last_boxed(solution)
    start = solution.rfind("\\boxed")
    end = start + len("\\boxed{") + len(content) + 1
    return solution[:start] + (content if answer is None else answer) + solution[end:]


def test_unboxed_reference_solutions():
    """MATH-500 solutions whose final box is removed: the answer is now plain LaTeX in the text
    (often not the last expression: the measured rate is 0.825; the old last-number rule gave 0.605)."""
    records = load_benchmark("math500")[:200]
    right = [grade(_unboxed(r["solution"]), r["answer"]) for r in records]
    accepted = [
        r["answer"] for r in records if grade(_unboxed(r["solution"], wrong_answer(r["answer"])), r["answer"])
    ]
    print(
        f"unboxed math500: {sum(right) / len(records):.3f} graded correct, {len(accepted)} wrong ones accepted"
    )
    assert sum(right) / len(records) >= 0.8
    assert len(accepted) / len(records) <= 0.03, accepted


def test_aime_and_amc_boxed_answers_grade_correct():
    for name in ("aime24", "amc23"):
        records = load_benchmark(name)
        assert all(grade(f"so we get \\boxed{{{r['answer']}}}", r["answer"]) for r in records), name


def test_extraction_rules():
    assert extract_answer("x \\boxed{1} then \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
    assert extract_answer("\\boxed{\\{1, \\{2\\}\\}}") == "\\{1, \\{2\\}\\}"
    assert extract_answer("\\fbox{7}") == "7"
    assert extract_answer("so the answer is 5.") == "5"
    assert extract_answer("we get 3 apples and 12 pears") == "12"
    assert extract_answer("#### 1,234") == "1,234"
    assert extract_answer("no answer here") is None
    assert extract_answer("\\boxed{unbalanced") is None


def test_equivalences():
    assert grade("\\boxed{0.5}", "\\frac{1}{2}")
    assert grade("\\boxed{\\frac12}", "0.5")
    assert grade("\\boxed{72,000}", "72000")
    assert grade("\\boxed{x^2+2x+1}", "(x+1)^2")
    assert not grade("\\boxed{3}", "4")
    assert not grade("", "4")


def test_math_reward_accepts_strings_and_chat_messages():
    completions = ["\\boxed{4}", [{"role": "assistant", "content": "so \\boxed{5}"}]]
    assert math_reward(["p", "p"], completions, answer=["4", "4"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 5000,
        "}" * 10000 + "\\boxed{}",
        "\\boxed{\\frac{\\frac{\\frac{1}{2}}{3}}{" + "x" * 100000 + "}}",
        "9" * 1_000_000,
        "\\boxed{10^{10^{10^{10}}}}",
        "\x00\x01\ud7ff",
        "$" * 1000 + "\\sqrt{" * 200,
    ],
)
def test_never_raises_and_is_bounded_on_adversarial_text(text):
    start = time.monotonic()
    assert grade(text, "4") in (True, False)
    extract_answer(text)
    assert time.monotonic() - start < 15


def test_huge_numbers_are_bounded_outside_the_main_thread():
    """math-verify's timeouts are signals (main thread only) and cannot stop sympy building
    10^(10^10) in C: such answers are compared as text (the old grader had not returned after 100 s)."""
    script = (
        "import threading\n"
        "from reasoning.rewards.math import grade\n"
        "texts = ['\\\\boxed{10^{10^{10^{10}}}}', 'so $99999999999^{99999999999}$', 'so $1000000!$']\n"
        "out = []\n"
        "worker = threading.Thread(target=lambda: out.extend(grade(t, '4') for t in texts))\n"
        "worker.start(); worker.join()\n"
        "print(out)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[False, False, False]", done.stderr[-2000:]
    assert grade("\\boxed{10^{10^{10^{10}}}}", "10^{10^{10^{10}}}")  # still equal as text


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=300), st.text(max_size=20))
def test_never_raises_on_random_text(response, gold):
    assert grade(response, gold) in (True, False)


def test_reference_steps_process_reward():
    from reasoning.data.synthetic import records_from_spec
    from reasoning.rewards.verifier import reference_steps

    record = records_from_spec("addition?digits=3&n=1&seed=1")[0]  # 137+582: 7+2=9,3+8=11,1+5+1=7
    completions = [
        "7+2=9,3+8=11,1+5+1=7\nA:719",  # all steps
        "7+2=9,3+8=12,1+5+1=7\nA:729",  # middle step wrong
        "7+2=9\nA:9",  # stops early
        "garbage",
    ]
    columns = {k: [v] * len(completions) for k, v in record.items()}
    assert reference_steps([""] * 4, completions, **columns) == [1.0, 2 / 3, 1 / 3, 0.0]
    countdown = records_from_spec("countdown?n=1&seed=1")[0]
    columns = {k: [v] for k, v in countdown.items()}
    assert reference_steps([""], [countdown["solution"] + "\nA:" + countdown["answer"]], **columns) == [None]
