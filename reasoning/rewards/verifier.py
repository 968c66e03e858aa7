"""Correctness rewards: the task's own verifier for synthetic tasks, math-verify otherwise."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from reasoning.data.answers import completion_text
from reasoning.data.synthetic import task_from_spec
from reasoning.data.templates import PlainTemplate
from reasoning.rewards.math import grade


@lru_cache(maxsize=32)
def _task(spec: str):
    return task_from_spec(spec)


def is_correct(completion: Any, record: dict[str, Any]) -> bool:
    """Whether a completion answers `record` correctly.

    Records of synthetic tasks carry a `task` spec (e.g. "countdown?n_numbers=3"): their answer
    follows the plain template's answer marker and is checked by the task's verifier. Other
    records are graded against `answer` with math-verify (`grade`).
    """
    text = completion_text(completion)
    spec = record.get("task")
    if spec:
        _, answer = PlainTemplate().split_completion(text)
        return answer is not None and _task(spec).verify(record, answer)
    return grade(text, str(record["answer"]))


def correctness(prompts: list, completions: list, **columns: Any) -> list[float]:
    """TRL-style reward: 1.0 for a correct final answer, 0.0 otherwise."""
    keys = [k for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)]
    return [
        float(is_correct(completion, {k: columns[k][i] for k in keys}))
        for i, completion in enumerate(completions)
    ]


def reference_steps(prompts: list, completions: list, **columns: Any) -> list[float | None]:
    """Process reward: the fraction of the reference solution's steps the trace reproduces in place.

    Steps are the comma-separated items of the trace (the synthetic tasks' format, e.g. addition's
    "7+5=12,4+8+1=13,3+2+1=6"); step i counts when the completion's step i equals the reference's.
    Only for tasks whose trace is unique given the question (addition): `None` (not applicable)
    for records without a `solution`, and for tasks with many valid traces such as countdown.
    """
    solutions = columns.get("solution") or [None] * len(completions)
    tasks = columns.get("task") or [None] * len(completions)
    scores: list[float | None] = []
    for completion, solution, task in zip(completions, solutions, tasks):
        if not solution or (task and not str(task).startswith("addition")):
            scores.append(None)
            continue
        trace, _ = PlainTemplate().split_completion(completion_text(completion))
        produced, reference = trace.strip().split(","), str(solution).split(",")
        scores.append(sum(p == r for p, r in zip(produced, reference)) / len(reference))
    return scores


__all__ = ["completion_text", "correctness", "is_correct", "reference_steps"]
