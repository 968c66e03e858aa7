"""Benchmark definitions: where the problems live and how an answer is read and graded.

The real benchmarks ship with the package as JSONL files in `reasoning/eval/data/` (sources, row
counts and licences in its README.md) and are read from there by default. A user may point at
another folder of the same files (`data_dir=`, or the environment variable
REASONING_BENCHMARKS_DIR) or ask for the Hugging Face hub explicitly (`source="hub"`); nothing is
looked up anywhere else. Field names differ per file and are mapped here. Synthetic benchmarks are
held-out problems of the embedded tasks, generated in process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import load_dataset

from reasoning.data.synthetic import records_from_spec
from reasoning.rewards.math import answer_letter, grade, last_boxed
from reasoning.rewards.verifier import is_correct

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
    """The option letter the response chose (`answer_letter`: its box, else its "answer is X"
    phrase, ...) equals the gold letter; a letter mentioned later in passing does not count."""
    return answer_letter(response) == str(record["answer"]).strip().strip("()").upper()


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
        records = records_from_spec(spec)
        if distinct is not None:
            firsts = {r["question"]: r for r in reversed(records)}  # the first occurrence wins
            records = [r for r in records if firsts[r["question"]] is r][:distinct]
        return records[:limit] if limit is not None else records

    return load


def _synthetic_grade(response: str, record: Record) -> bool:
    return is_correct(response, record)


def synthetic_benchmark(name: str, spec: str, distinct: int | None = None) -> Benchmark:
    """The held-out problems of an embedded task (`records_from_spec(spec)`; with `distinct`, the first
    that many distinct questions), graded by the task's verifier, with a 64-token answer budget."""
    return Benchmark(
        name,
        None,
        _field("question"),
        _field("answer"),
        _field("solution"),
        loader=_synthetic_loader(spec, distinct),
        grader=_synthetic_grade,
        max_tokens=64,
    )


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
    "addition": synthetic_benchmark("addition", "addition?digits=3&n=200&seed=12345&split=test"),
    "countdown": synthetic_benchmark("countdown", "countdown?n_numbers=3&n=200&seed=12345&split=test"),
    # the small-number countdown the demo recipes train on (numbers 1-9, targets up to 30)
    # (a small problem space: draw 400 and keep the first 200 distinct questions)
    "countdown_easy": synthetic_benchmark(
        "countdown_easy",
        "countdown?n_numbers=3&max_number=9&max_target=30&n=400&seed=12345&split=test",
        distinct=200,
    ),
}


BENCHMARKS_DIR_ENV = "REASONING_BENCHMARKS_DIR"
SOURCES = ("local", "hub")


class BenchmarkUnavailableError(OSError):
    """A benchmark's problems could not be read: a missing local file, or an unreachable hub."""


def embedded_benchmarks_dir() -> Path:
    """The folder of benchmark files shipped inside the package (installed with it as package data)."""
    return Path(__file__).resolve().parent / "data"


def benchmark_file(name: str, data_dir: str | Path | None = None) -> Path:
    """The local JSONL file `load_benchmark(name, data_dir=data_dir)` reads: in `data_dir`, else in
    $REASONING_BENCHMARKS_DIR, else in the embedded folder. The file need not exist."""
    bench = _known(name)
    if bench.file is None:
        raise ValueError(f"benchmark {name!r} is generated in process and has no file")
    return _local_folder(data_dir)[0] / bench.file


def benchmark_origin(source: str = "local", data_dir: str | Path | None = None) -> str:
    """Where `load_benchmark` with these arguments reads problems from ("hub", or the local folder),
    for results files."""
    if source not in SOURCES:
        raise ValueError(f"benchmark source must be one of {', '.join(SOURCES)}, got {source!r}")
    return "hub" if source == "hub" else str(_local_folder(data_dir)[0])


def _known(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


def _local_folder(data_dir: str | Path | None) -> tuple[Path, str]:
    """(folder, how it was chosen) for the local files."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir), "data_dir"
    env = os.environ.get(BENCHMARKS_DIR_ENV)
    if env:
        return Path(env), f"${BENCHMARKS_DIR_ENV}"
    return embedded_benchmarks_dir(), "the copy embedded in the package"


def _local_rows(bench: Benchmark, data_dir: str | Path | None) -> tuple[list[Record], str]:
    folder, chosen_by = _local_folder(data_dir)
    path = folder / bench.file
    if not path.is_file():
        hub = f"source='hub' (CLI: --benchmark-source hub) to download {bench.hub[0]}" if bench.hub else ""
        fixes = [
            f"put {bench.file} in {folder}",
            "point data_dir (CLI: --benchmarks-dir) at a folder that has it",
            f"unset {BENCHMARKS_DIR_ENV} to use the embedded copy" if chosen_by.startswith("$") else "",
            hub,
        ]
        raise BenchmarkUnavailableError(
            f"benchmark {bench.name!r}: no file {bench.file} in {folder} (the folder given by {chosen_by}); "
            f"{'; or '.join(f for f in fixes if f)}"
        )
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows, str(path)


def _hub_rows(bench: Benchmark) -> tuple[list[Record], str]:
    if bench.hub is None:
        raise ValueError(f"benchmark {bench.name!r} has no hub location; load it from its local file")
    dataset, config, split = bench.hub
    where = f"{dataset}" + (f" (config {config})" if config else "") + f", split {split}"
    try:
        rows = list(load_dataset(dataset, config, split=split))
    except Exception as err:  # offline, unknown dataset, renamed split: all mean "no hub copy"
        raise BenchmarkUnavailableError(
            f"benchmark {bench.name!r}: could not load {where} from the Hugging Face hub "
            f"({type(err).__name__}: {err}). The hub is used only when asked for (source='hub'); "
            f"without it the embedded copy in {embedded_benchmarks_dir()} is read"
        ) from err
    return rows, f"hub {where}"


def load_benchmark(
    name: str, limit: int | None = None, data_dir: str | Path | None = None, source: str = "local"
) -> list[Record]:
    """Records {id, question, answer, solution} of a benchmark (its first `limit` problems).

    source="local" (default) reads `<folder>/<file>.jsonl` where folder is `data_dir`, else
    $REASONING_BENCHMARKS_DIR, else the copy embedded in the package; a missing file is an error,
    never a download. source="hub" loads the benchmark's Hugging Face dataset instead. Synthetic
    benchmarks are generated in process whatever the source.
    """
    bench = _known(name)
    if source not in SOURCES:
        raise ValueError(f"benchmark source must be one of {', '.join(SOURCES)}, got {source!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 (or None for every problem), got {limit}")
    if bench.loader is not None:
        return bench.loader(limit)
    if source == "hub" and data_dir is not None:
        raise ValueError(f"benchmark {name!r}: give either data_dir (local files) or source='hub', not both")
    rows, origin = _hub_rows(bench) if source == "hub" else _local_rows(bench, data_dir)
    if limit is not None:
        rows = rows[:limit]
    records = []
    for i, row in enumerate(rows):
        record = {
            "id": row.get("id", row.get("idx", i)),
            "question": bench.question(row),
            "answer": bench.answer(row),
            "solution": bench.solution(row),
        }
        empty = [key for key in ("question", "answer") if not str(record[key]).strip()]
        if empty:  # another copy with other field names would otherwise be graded on empty strings
            raise ValueError(
                f"benchmark {name!r}: row {i} of {origin} has an empty {' and '.join(empty)} "
                f"(its fields: {', '.join(row)}); the fields each file needs are listed in "
                f"{embedded_benchmarks_dir() / 'README.md'}"
            )
        records.append(record)
    return records
