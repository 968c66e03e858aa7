"""Dataset loading with explicit column mapping and clear errors."""

import json

import pytest
from datasets import Dataset

from reasoning.data.datasets import load_records
from reasoning.eval.benchmarks import BENCHMARKS, benchmarks_dir, load_benchmark

MATH500 = benchmarks_dir() / "math500.jsonl"


def test_local_jsonl_with_column_mapping():
    records = load_records(str(MATH500), {"question": "problem"}, limit=10)
    assert len(records) == 10
    assert {"question", "answer", "solution"} <= set(records.column_names)
    assert records[0]["question"].startswith("Convert the point")


def test_missing_column_lists_available_ones():
    with pytest.raises(ValueError, match=r"'question'.*available columns: problem, solution, answer"):
        load_records(str(MATH500), limit=3)


def test_parquet_and_optional_solution(tmp_path):
    path = tmp_path / "d.parquet"
    Dataset.from_list([{"q": "1+1", "a": "2"}, {"q": "2+2", "a": "4"}]).to_parquet(str(path))
    records = load_records(str(path), {"question": "q", "answer": "a"})
    assert records["question"] == ["1+1", "2+2"] and records["solution"] == ["", ""]


def test_unsupported_extension_and_missing_file(tmp_path):
    bad = tmp_path / "d.csvx"
    bad.write_text("x")
    with pytest.raises(ValueError, match="supported extensions: .jsonl, .json, .parquet"):
        load_records(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_synthetic_spec():
    records = load_records("synthetic:addition?digits=2&n=7&seed=1&split=train")
    assert len(records) == 7 and records[0]["task"] == "addition?digits=2"


README_ROWS = {
    "gsm8k": 1319,
    "math500": 500,
    "aime24": 30,
    "amc23": 40,
    "minerva_math": 272,
    "olympiadbench": 675,
    "sat_math": 32,
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_loads_with_nonempty_fields(name):
    records = load_benchmark(name)
    assert len(records) == README_ROWS.get(name, 200)
    assert all(r["question"].strip() and str(r["answer"]).strip() for r in records)
    assert len({json.dumps(r["question"]) for r in records}) > 0.9 * len(records)


def test_unknown_benchmark_lists_names():
    with pytest.raises(ValueError, match="known benchmarks: addition, aime24, amc23"):
        load_benchmark("mmlu")
