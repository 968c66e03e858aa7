"""Synthetic tasks: deterministic, verifiers accept references and reject corruptions, never execute text."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reasoning.data.synthetic import (
    AdditionTask,
    CountdownTask,
    in_test_split,
    is_traced,
    make_task,
    records_from_spec,
    task_from_spec,
)


def test_generation_is_deterministic_by_seed():
    for task in (AdditionTask(3), CountdownTask()):
        assert task.generate(50, seed=1) == task.generate(50, seed=1)
        assert task.generate(50, seed=1) != task.generate(50, seed=2)


@pytest.mark.parametrize("digits", [1, 2, 3, 4, 5])
def test_addition_references_verify_and_traces_are_right(digits):
    task = AdditionTask(digits)
    for problem in task.generate(1000, seed=digits):
        assert task.verify(problem, problem.answer)
        a, b = problem.meta["a"], problem.meta["b"]
        steps = problem.trace.split(",")
        assert len(steps) == digits
        carry = 0
        for i, step in enumerate(steps):
            left, total = step.split("=")
            terms = [int(x) for x in left.split("+")]
            assert terms[0] == a // 10**i % 10 and terms[1] == b // 10**i % 10
            assert sum(terms) == int(total) and (terms[2] if len(terms) == 3 else 0) == carry
            carry = int(total) // 10
        assert int(problem.answer) == a + b


def test_addition_example_format():
    assert AdditionTask(3).solve(347, 285).trace == "7+5=12,4+8+1=13,3+2+1=6"
    assert AdditionTask(3).solve(999, 1).trace == "9+1=10,9+0+1=10,9+0+1=10"


def test_flawed_teacher_forgets_carries_and_the_verifier_still_grades_the_sum():
    flawed = AdditionTask(3).solve(847, 285, forget_carry=True)
    assert (flawed.trace, flawed.answer) == ("7+5=12,4+8=12,8+2=10", "1022")
    assert AdditionTask(3).solve(847, 285).answer == "1132"
    clean, half, always = (AdditionTask(3, forget_carry=p).generate(2000, seed=3) for p in (0.0, 0.5, 1.0))
    assert [p.question for p in half] == [p.question for p in clean]  # same problems, same seeds
    assert clean == AdditionTask(3).generate(2000, seed=3)
    task = AdditionTask(3)
    wrong = [not task.verify(p, p.answer) for p in half]
    def has_carry(trace: str) -> bool:
        return any(step.count("+") == 2 for step in trace.split(","))

    carries = [has_carry(p.trace) for p in clean]  # problems where forgetting a carry matters
    assert not any(has_carry(p.trace) for p in always)
    assert all(not task.verify(p, p.answer) for p, c in zip(always, carries) if c)
    share = sum(wrong) / sum(carries)
    assert 0.45 < share < 0.55, share  # half of the carry problems are worked by the flawed solver
    assert not any(w and not c for w, c in zip(wrong, carries))  # carry-free problems stay right
    with pytest.raises(ValueError, match="forget_carry"):
        AdditionTask(3, forget_carry=1.5)
    rows = records_from_spec("addition?digits=3&forget_carry=1.0&n=50&seed=3")
    assert [r["solution"] for r in rows] == [p.trace for p in always[:50]]
    assert rows[0]["task"] == "addition?digits=3"  # the records' verifier is the true one


def test_addition_rejects_corrupted_answers():
    task = AdditionTask(3)
    problem = task.solve(347, 285)
    for bad in ["633", "631", "362", "632x", " 6 32", "", "-632", "６３２", "632.0", "0x278", "1e3"]:
        assert not task.verify(problem, bad), bad
    assert task.verify(problem, " 632 ")


@pytest.mark.parametrize("n_numbers", [3, 4])
def test_countdown_references_verify_and_traces_are_right(n_numbers):
    task = CountdownTask(n_numbers=n_numbers)
    for problem in task.generate(1000 if n_numbers == 3 else 300, seed=n_numbers):
        assert task.verify(problem, problem.answer)
        for step in problem.trace.split(","):
            left, value = step.split("=")
            for op in "+-*/":
                if op in left[1:]:
                    i = left.index(op, 1)
                    a, b = int(left[:i]), int(left[i + 1 :])
                    expected = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
                    assert expected == int(value)
                    break
        assert step.endswith(f"={problem.meta['target']}")


def test_countdown_solutions_contain_reference_and_all_verify():
    task = CountdownTask()
    for problem in task.generate(100, seed=7):
        solutions = task.solutions(problem)
        assert problem.answer in solutions
        assert all(task.verify(problem, s) for s in solutions)
    assert len(task.solutions({"question": "1 2 3->6"})) > 3  # many valid solutions


def test_countdown_rejects_bad_expressions(tmp_path):
    task = CountdownTask()
    problem = {"question": "3 5 7->22"}
    assert task.verify(problem, "3*5+7") and task.verify(problem, "7+5*3") and task.verify(problem, "(5*3)+7")
    marker = tmp_path / "executed"
    for bad in [
        "3*5+8",  # number not given
        "3*5+7+7-7",  # numbers reused
        "3*5",  # not all numbers used
        "22",
        "__import__('os')",
        f"open('{marker}','w')",
        "x+3*5+7",
        "(3).real*5+7",
        "3**2+13",
        "3*5+7;1",
        "(" * 60 + "3*5+7" + ")" * 60,
        "1" * 200,
        "7/0+3*5",
        "",
    ]:
        assert not task.verify(problem, bad), bad
    assert not marker.exists()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_verifiers_never_raise(answer):
    assert CountdownTask().verify({"question": "3 5 7->22"}, answer) in (True, False)
    assert AdditionTask().verify({"question": "3+4"}, answer) in (True, False)


def test_splits_are_disjoint_and_hash_defined():
    task = AdditionTask(3)
    train = {p.question for p in task.generate(3000, seed=0, split="train")}
    test = {p.question for p in task.generate(300, seed=0, split="test")}
    assert not train & test
    assert all(in_test_split(q) for q in test) and not any(in_test_split(q) for q in train)


def test_specs_and_records():
    records = records_from_spec("countdown?n_numbers=4&n=5&seed=3&split=train")
    assert len(records) == 5 and {"id", "question", "answer", "solution", "task"} <= set(records[0])
    task = task_from_spec(records[0]["task"])
    assert isinstance(task, CountdownTask) and task.n_numbers == 4
    assert all(task.verify(r, r["answer"]) for r in records)
    with pytest.raises(ValueError, match="choose one of addition, countdown"):
        make_task("sudoku")
    with pytest.raises(ValueError, match="bad settings"):
        make_task("addition", digts=3)


def test_traced_share_makes_answers_only_records():
    """`traced=p`: a stable, hash-chosen share of questions keeps its trace; the rest carry the correct
    answer only (the true sum, not a flawed teacher's)."""
    spec = "addition?digits=3&forget_carry=0.6&n=4000&seed=0&split=train"
    full = records_from_spec(spec)
    some = records_from_spec(spec + "&traced=0.05")
    assert [r["question"] for r in some] == [r["question"] for r in full]
    traced = [r for r in some if r["traced"]]
    assert 0.03 < len(traced) / len(some) < 0.07
    for before, after in zip(full, some):
        if after["traced"]:  # untouched, flaws included
            assert (after["solution"], after["answer"]) == (before["solution"], before["answer"])
        else:
            assert after["solution"] == "" and after["answer"] == str(after["a"] + after["b"])
    flawed = [b for b, a in zip(full, some) if not a["traced"] and b["answer"] != str(b["a"] + b["b"])]
    assert flawed  # the flawed teacher's answers were replaced
    again = records_from_spec(spec.replace("seed=0", "seed=1") + "&traced=0.05")
    for r in again:  # the choice is a function of the question alone
        assert r["traced"] == is_traced(r["question"], 0.05)
    assert all(r["traced"] for r in records_from_spec(spec + "&traced=1"))
    with pytest.raises(ValueError, match="share of questions with a reference trace"):
        records_from_spec(spec + "&traced=1.5")
