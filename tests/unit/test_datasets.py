"""Dataset loading with explicit column mapping and clear errors; the benchmark files that ship inside
the package (read from there by default, from a user's folder or the hub only when asked)."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tokenize
import zipfile
from pathlib import Path

import pytest
from datasets import Dataset

from reasoning.data.datasets import load_records
from reasoning.eval.benchmarks import (
    BENCHMARKS,
    BENCHMARKS_DIR_ENV,
    BenchmarkUnavailableError,
    benchmark_file,
    benchmark_origin,
    embedded_benchmarks_dir,
    load_benchmark,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = embedded_benchmarks_dir()
MATH500 = DATA / "math500.jsonl"


@pytest.fixture(autouse=True)
def _no_benchmarks_dir_from_the_environment(monkeypatch):
    """These tests are about the embedded copy unless they set the variable themselves."""
    monkeypatch.delenv(BENCHMARKS_DIR_ENV, raising=False)


def readme_rows() -> dict[str, tuple[int, str]]:
    """{file: (rows, benchmark name)} from the table in the data folder's README."""
    text = (DATA / "README.md").read_text()
    table = re.findall(r"^\| (\S+\.jsonl) \| (\d+) \| .+ \| (\w+) \|$", text, flags=re.MULTILINE)
    return {file: (int(rows), name) for file, rows, name in table}


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


def test_embedded_folder_readme_and_benchmarks_agree():
    """Every file in the package's data folder is a benchmark listed in its README, and back."""
    listed = readme_rows()
    assert DATA == ROOT / "reasoning" / "eval" / "data" and DATA.is_dir()
    assert set(listed) == {p.name for p in DATA.glob("*.jsonl")}
    assert {name: BENCHMARKS[name].file for _, name in listed.values()} == {
        name: bench.file for name, bench in BENCHMARKS.items() if bench.file is not None
    }
    for file, (rows, _) in listed.items():
        with (DATA / file).open() as f:
            assert sum(1 for line in f if line.strip()) == rows, file


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_loads_from_the_embedded_copy(name):
    records = load_benchmark(name)
    bench = BENCHMARKS[name]
    if bench.file is None:  # generated: 200 held-out problems of a synthetic task
        assert len(records) == 200
    else:
        assert benchmark_file(name) == DATA / bench.file
        assert len(records) == readme_rows()[bench.file][0]
    assert all(r["question"].strip() and str(r["answer"]).strip() for r in records)
    assert len({json.dumps(r["question"]) for r in records}) > 0.9 * len(records)
    assert load_benchmark(name, limit=3) == records[:3]


def test_unknown_benchmark_lists_names():
    with pytest.raises(ValueError, match="known benchmarks: addition, aime24, amc23"):
        load_benchmark("mmlu")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_data_dir_and_environment_point_at_another_copy(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    write_jsonl(
        mine / "gsm8k.jsonl",
        [{"question": "1+2?", "answer": "1+2=3\n#### 3"}, {"question": "2*3?", "answer": "so 6\n#### 6"}],
    )
    records = load_benchmark("gsm8k", data_dir=mine)
    assert [(r["question"], r["answer"], r["solution"]) for r in records] == [
        ("1+2?", "3", "1+2=3"),
        ("2*3?", "6", "so 6"),
    ]
    assert [r["id"] for r in records] == [0, 1]  # no id field: the row number
    assert benchmark_origin("local", mine) == str(mine)

    monkeypatch.setenv(BENCHMARKS_DIR_ENV, str(mine))
    assert load_benchmark("gsm8k") == records and benchmark_file("gsm8k") == mine / "gsm8k.jsonl"
    assert len(load_benchmark("gsm8k", data_dir=DATA)) == 1319  # the argument wins over the variable
    assert benchmark_origin() == str(mine) and benchmark_origin("hub") == "hub"


def test_missing_local_file_names_the_file_the_folder_and_the_fixes(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchmarkUnavailableError) as err:
        load_benchmark("math500", data_dir=empty)
    message = str(err.value)
    assert f"no file math500.jsonl in {empty} (the folder given by data_dir)" in message
    assert "--benchmarks-dir" in message and "source='hub'" in message and "HuggingFaceH4/MATH-500" in message

    monkeypatch.setenv(BENCHMARKS_DIR_ENV, str(empty))
    with pytest.raises(
        BenchmarkUnavailableError, match=rf"given by \${BENCHMARKS_DIR_ENV}.*unset {BENCHMARKS_DIR_ENV}"
    ):
        load_benchmark("aime24")


def test_bad_files_and_arguments_are_clear_errors(tmp_path):
    write_jsonl(tmp_path / "math500.jsonl", [{"question": "x", "final": "1"}])  # another copy's field names
    with pytest.raises(
        ValueError,
        match=r"row 0 of .*math500.jsonl has an empty question and answer \(its fields: question, final\)",
    ):
        load_benchmark("math500", data_dir=tmp_path)
    (tmp_path / "amc23.jsonl").write_text('{"question": "q", "answer": "1"}\n{"question": \n')
    with pytest.raises(ValueError, match=r"amc23.jsonl, line 2: not valid JSON"):
        load_benchmark("amc23", data_dir=tmp_path)
    (tmp_path / "aime24.jsonl").write_text('["problem", "answer"]\n')
    with pytest.raises(ValueError, match=r"aime24.jsonl, line 1: expected a JSON object, got list"):
        load_benchmark("aime24", data_dir=tmp_path)
    with pytest.raises(ValueError, match="benchmark source must be one of local, hub, got 'web'"):
        load_benchmark("gsm8k", source="web")
    with pytest.raises(ValueError, match="either data_dir .* or source='hub', not both"):
        load_benchmark("gsm8k", data_dir=tmp_path, source="hub")
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_benchmark("gsm8k", limit=-1)
    with pytest.raises(ValueError, match="generated in process and has no file"):
        benchmark_file("addition")


def run_python(code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter: HF hub offline with an empty cache, no benchmarks folder variable."""
    environment = {k: v for k, v in os.environ.items() if k != BENCHMARKS_DIR_ENV}
    environment.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / ".hf-home"), **env})
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300
    )


def test_explicit_hub_request_offline_is_a_clear_error(tmp_path):
    """Real `datasets` in offline mode (empty cache): the error is ours, names the dataset and the way back."""
    code = (
        "from reasoning.eval.benchmarks import load_benchmark\n"
        "try:\n"
        "    load_benchmark('gsm8k', limit=3, source='hub')\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, '|', err)\n"
        "else:\n"
        "    print('LOADED')\n"
    )
    done = run_python(code, tmp_path, {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.strip()
    assert out != "LOADED", "offline datasets loaded the hub copy (a cached copy under HF_HOME?)"
    kind, message = out.split(" | ", 1)
    assert kind == "BenchmarkUnavailableError"
    assert (
        "benchmark 'gsm8k': could not load openai/gsm8k (config main), split test from the Hugging Face hub"
        in message
    )
    assert "offline" in message.lower()  # the cause, from datasets
    assert f"the embedded copy in {DATA}" in message


LOADER = """
import json, os, sys
opened = []  # every file this interpreter opens by name (the audit hook sees Path and str alike)
def record(event, args):
    if event == "open" and isinstance(args[0], (str, os.PathLike)):
        opened.append(os.fspath(args[0]))
sys.addaudithook(record)
import reasoning
from reasoning.eval.benchmarks import BENCHMARKS, benchmark_file, load_benchmark
counts = {n: len(load_benchmark(n)) for n, b in BENCHMARKS.items() if b.file}
files = {n: str(benchmark_file(n)) for n in counts}
print(json.dumps({"package": reasoning.__file__, "counts": counts, "files": files,
                  "opened": [p for p in opened if p.endswith(".jsonl")]}))
"""


def check_loads_inside(done: subprocess.CompletedProcess, home: Path) -> None:
    """The subprocess imported `reasoning` from `home`, read every benchmark from `home`'s data folder
    with the README's row counts, and opened no JSONL file elsewhere."""
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    data = home / "reasoning" / "eval" / "data"
    assert Path(seen["package"]) == home / "reasoning" / "__init__.py"
    assert seen["counts"] == {name: rows for rows, name in readme_rows().values()}
    assert all(Path(path).parent == data for path in seen["files"].values())
    assert seen["opened"] and all(Path(path).parent == data for path in seen["opened"]), seen["opened"]


def copy_project(destination: Path) -> Path:
    """The package, pyproject.toml and README.md (all a build needs), without caches."""
    destination.mkdir(parents=True)
    shutil.copytree(
        ROOT / "reasoning", destination / "reasoning", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    return destination


def test_a_copy_of_the_package_elsewhere_reads_only_its_own_files(tmp_path):
    """No `shared/` folder anywhere above the copy, the hub offline: it still loads every benchmark,
    from its own data folder (a real subprocess importing the copy, not this checkout)."""
    repo = copy_project(tmp_path / "elsewhere" / "repo")
    assert not any((folder / "shared").exists() for folder in [repo, *repo.parents])
    check_loads_inside(run_python(LOADER, repo, {"PYTHONPATH": str(repo)}), repo)


def test_a_built_wheel_ships_and_reads_the_benchmark_files(tmp_path):
    """A non-editable install finds the files: build a wheel (pip, no build isolation: offline), unpack
    it as site-packages would, and load every benchmark from it."""
    repo = copy_project(tmp_path / "src")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(repo)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = wheels.glob("reasoning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"reasoning/eval/data/{file}" for file in [*readme_rows(), "README.md"]}
    assert expected <= names, sorted(expected - names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    check_loads_inside(run_python(LOADER, tmp_path, {"PYTHONPATH": str(site)}), site)


def test_no_code_looks_for_a_shared_folder():
    """No string literal in the package names a `shared` folder (the old lookup walked up to one)."""
    offenders = []
    for path in sorted((ROOT / "reasoning").rglob("*.py")):
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type == tokenize.STRING and re.fullmatch(
                r"[rbuf]*(['\"])(\.\./)*shared([/\\].*)?\1", token.string, flags=re.IGNORECASE
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{token.start[0]}: {token.string}")
    assert not offenders, offenders


def test_cli_benchmark_source_and_folder_errors_come_before_any_model(tmp_path):
    """`reasoning eval` reads the problems first: a missing file or a bad source is exit 2 with our
    message, although --model names no model at all."""
    env = {k: v for k, v in os.environ.items() if k != BENCHMARKS_DIR_ENV}
    base = [
        sys.executable,
        "-m",
        "reasoning",
        "eval",
        "--model",
        str(tmp_path / "nothing"),
        "--benchmarks",
        "gsm8k",
    ]
    missing = subprocess.run(
        [*base, "--benchmarks-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert f"no file gsm8k.jsonl in {tmp_path}" in " ".join(missing.stderr.split())
    bad = subprocess.run(
        [*base, "--benchmark-source", "web"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "benchmark source must be one of local, hub" in bad.stderr
