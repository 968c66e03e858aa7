"""Benchmark definitions: where the problems live and how an answer is read and graded.

Real benchmarks read the local JSONL copies in `shared/benchmarks` (found from the environment
variable REASONING_BENCHMARKS_DIR, else by walking up from the working directory and from
this package) and fall back to the Hugging Face hub for users. Field names differ per file
and are mapped here. Synthetic benchmarks are held-out problems of the embedded tasks.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasoning.rewards.math import grade, last_boxed

Record = dict[str, Any]


def _gsm8k_answer(row: Record) -> str:
    return row["answer"].split("####")[-1].strip().replace(",", "")


def _gsm8k_solution(row: Record) -> str:
    return row["answer"].split("####")[0].strip()


def _minerva_answer(row: Record) -> str:
    return last_boxed(row["solution"]) or ""


def _olympiad_answer(row: Record) -> str:
    answer = row["final_answer"]
    if isinstance(answer, list):
        answer = answer[0] if len(answer) == 1 else ", ".join(answer)
    return str(answer).strip("$ ")


def _olympiad_solution(row: Record) -> str:
    solution = row.get("solution", "")
    return "\n".join(solution) if isinstance(solution, list) else str(solution)


def _sat_question(row: Record) -> str:
    return f"{row['question']}\nOptions: {row['options']}\nAnswer with the letter of the correct option."


def _grade_choice(response: str, record: Record) -> bool:
    boxed = last_boxed(response[-4000:])
    text = boxed if boxed is not None else response[-200:]
    letters = re.findall(r"\b([A-D])\b", text)
    return bool(letters) and letters[-1] == str(record["answer"]).strip()


def _field(name: str) -> Callable[[Record], str]:
    return lambda row: str(row.get(name, "") or "")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: local file, field getters, hub location, grader and answer budget."""

    name: str
    file: str | None
    question: Callable[[Record], str]
    answer: Callable[[Record], str]
    solution: Callable[[Record], str] = lambda row: ""
    hub: tuple[str, str | None, str] | None = None  # (dataset, config, split)
    loader: Callable[[int | None], list[Record]] | None = None
    grader: Callable[[str, Record], bool] | None = None
    max_tokens: int = 4096

    def grade(self, response: str, record: Record) -> bool:
        """Whether `response` answers `record` correctly."""
        if self.grader is not None:
            return self.grader(response, record)
        return grade(response, record["answer"])


def _synthetic_loader(spec: str, distinct: int | None = None) -> Callable[[int | None], list[Record]]:
    """Records of a synthetic spec; with `distinct`, the first that many distinct questions of it."""

    def load(limit: int | None) -> list[Record]:
        from reasoning.data.synthetic import records_from_spec

        records = records_from_spec(spec)
        if distinct is not None:
            firsts = {r["question"]: r for r in reversed(records)}  # the first occurrence wins
            records = [r for r in records if firsts[r["question"]] is r][:distinct]
        return records[:limit] if limit is not None else records

    return load


def _synthetic_grade(response: str, record: Record) -> bool:
    from reasoning.rewards.verifier import is_correct

    return is_correct(response, record)


BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark(
        "gsm8k",
        "gsm8k.jsonl",
        _field("question"),
        _gsm8k_answer,
        _gsm8k_solution,
        hub=("openai/gsm8k", "main", "test"),
        max_tokens=2048,
    ),
    "math500": Benchmark(
        "math500",
        "math500.jsonl",
        _field("problem"),
        _field("answer"),
        _field("solution"),
        hub=("HuggingFaceH4/MATH-500", None, "test"),
    ),
    "aime24": Benchmark(
        "aime24",
        "aime24.jsonl",
        _field("problem"),
        _field("answer"),
        _field("solution"),
        hub=("HuggingFaceH4/aime_2024", None, "train"),
        max_tokens=8192,
    ),
    "amc23": Benchmark(
        "amc23",
        "amc23.jsonl",
        _field("question"),
        _field("answer"),
        hub=("math-ai/amc23", None, "test"),
        max_tokens=8192,
    ),
    "minerva_math": Benchmark(
        "minerva_math",
        "minerva_math.jsonl",
        _field("problem"),
        _minerva_answer,
        _field("solution"),
        hub=("math-ai/minervamath", None, "test"),
    ),
    "olympiadbench": Benchmark(
        "olympiadbench",
        "olympiadbench.jsonl",
        _field("question"),
        _olympiad_answer,
        _olympiad_solution,
        hub=("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
    ),
    "sat_math": Benchmark(
        "sat_math",
        "sat_math.jsonl",
        _sat_question,
        _field("Answer"),
        grader=_grade_choice,
        hub=("knoveleng/SAT-Math", None, "test"),
        max_tokens=2048,
    ),
    # Held-out problems of the embedded tasks (the test split never appears in training data).
    "addition": Benchmark(
        "addition",
        None,
        _field("question"),
        _field("answer"),
        _field("solution"),
        loader=_synthetic_loader("addition?digits=3&n=200&seed=12345&split=test"),
        grader=_synthetic_grade,
        max_tokens=64,
    ),
    "countdown": Benchmark(
        "countdown",
        None,
        _field("question"),
        _field("answer"),
        _field("solution"),
        loader=_synthetic_loader("countdown?n_numbers=3&n=200&seed=12345&split=test"),
        grader=_synthetic_grade,
        max_tokens=64,
    ),
    # the small-number countdown the demo recipes train on (numbers 1-9, targets up to 30)
    "countdown_easy": Benchmark(
        "countdown_easy",
        None,
        _field("question"),
        _field("answer"),
        _field("solution"),
        # a small problem space: draw 400 and keep the first 200 distinct questions
        loader=_synthetic_loader(
            "countdown?n_numbers=3&max_number=9&max_target=30&n=400&seed=12345&split=test", distinct=200
        ),
        grader=_synthetic_grade,
        max_tokens=64,
    ),
}


def benchmarks_dir() -> Path | None:
    """The folder with the local benchmark files, if one can be found."""
    env = os.environ.get("REASONING_BENCHMARKS_DIR")
    if env:
        return Path(env)
    for start in (Path.cwd(), Path(__file__).resolve()):
        for folder in [start, *start.parents]:
            candidate = folder / "shared" / "benchmarks"
            if candidate.is_dir():
                return candidate
            sibling = folder.parent / "shared" / "benchmarks"
            if sibling.is_dir():
                return sibling
    return None


def _hub_rows(bench: Benchmark) -> list[Record]:
    from datasets import load_dataset

    if bench.hub is None:
        raise FileNotFoundError(f"no local file for benchmark {bench.name!r} and no hub location")
    name, config, split = bench.hub
    return list(load_dataset(name, config, split=split))


def load_benchmark(name: str, limit: int | None = None, data_dir: str | Path | None = None) -> list[Record]:
    """Records {id, question, answer, solution, ...} of a benchmark (first `limit` problems)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(BENCHMARKS))}")
    bench = BENCHMARKS[name]
    if bench.loader is not None:
        return bench.loader(limit)
    folder = Path(data_dir) if data_dir else benchmarks_dir()
    path = folder / bench.file if folder and bench.file else None
    if path is not None and path.exists():
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        rows = _hub_rows(bench)
    if limit is not None:
        rows = rows[:limit]
    records = []
    for i, row in enumerate(rows):
        records.append(
            {
                "id": row.get("id", row.get("idx", i)),
                "question": bench.question(row),
                "answer": bench.answer(row),
                "solution": bench.solution(row),
            }
        )
    return records
