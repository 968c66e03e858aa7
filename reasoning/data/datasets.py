"""Load training and evaluation records with canonical columns: question, answer, solution.

Sources: a Hugging Face dataset name (for users; needs the network), a local `.jsonl`,
`.json` or `.parquet` file, or an embedded synthetic task spec `synthetic:TASK?key=value&...`.
`columns` maps the canonical names to the source's own column names.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, Value, load_dataset
from datasets.exceptions import DatasetGenerationError

from reasoning.data.synthetic import records_from_spec

REQUIRED = ("question", "answer")
OPTIONAL = ("solution",)
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Data that cannot be trained on; the message names the source, the row or column, and the fix."""


def _load_source(source: str, split: str) -> Dataset:
    if source.startswith("synthetic:"):
        try:
            return Dataset.from_list(records_from_spec(source.removeprefix("synthetic:")))
        except ValueError as err:
            raise DataError(f"data source {source!r}: {err}") from err
    path = Path(source)
    if path.suffix in FILE_FORMATS or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"data file {source!r} does not exist")
        if path.suffix not in FILE_FORMATS:
            raise DataError(
                f"unsupported data file {source!r}; supported extensions: {', '.join(FILE_FORMATS)}"
            )
        if path.stat().st_size < 4096 and not path.read_bytes().strip():  # datasets: StopIteration
            raise DataError(f"data file {source!r} is empty (no records)")
        try:
            return load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
        except DatasetGenerationError as err:  # malformed JSON lines, a truncated parquet file, ...
            raise DataError(f"data file {source!r} cannot be read: {err.__cause__ or err}") from err
    return load_dataset(source, split=split)


def load_records(
    source: str, columns: dict[str, str] | None = None, split: str = "train", limit: int | None = None
) -> Dataset:
    """A dataset with `question`, `answer` and `solution` columns (plus the source's other columns).

    A missing required column is an error naming it, the source and the available columns.
    """
    columns = dict(columns or {})
    unknown = [k for k in columns if k not in REQUIRED + OPTIONAL]
    if unknown:
        raise DataError(f"column mapping keys {unknown} are not canonical names; use {REQUIRED + OPTIONAL}")
    dataset = _load_source(source, split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    available = list(dataset.column_names)
    renames = {}
    for name in REQUIRED + OPTIONAL:
        origin = columns.get(name, name)
        if origin not in available:
            if name in REQUIRED:
                raise DataError(
                    f"column {origin!r} (for {name!r}) is missing from {source!r}; available columns: "
                    f"{', '.join(available)}; map it with data.columns, e.g. {{{name}: <column>}}"
                )
            continue
        if origin != name:
            renames[origin] = name
    clashes = [new for old, new in renames.items() if new in available and new not in renames]
    if clashes:
        dataset = dataset.remove_columns(clashes)
    dataset = dataset.rename_columns(renames) if renames else dataset
    if "solution" not in dataset.column_names:
        dataset = dataset.add_column("solution", [""] * len(dataset))
    check_records(dataset, source, limit)
    # declare the string type: otherwise map casts str(42) back to a numeric column's int64
    features = dataset.features.copy()
    features["question"] = features["answer"] = Value("string")
    return dataset.map(
        lambda row: {"question": str(row["question"]), "answer": str(row["answer"])}, features=features
    )


def check_records(dataset: Dataset, source: str, limit: int | None = None) -> None:
    """Non-empty, and every question and answer a non-empty string, a number or a boolean (made strings).

    None, lists and mappings are errors naming the first bad row: `str()` of them would silently
    train on "None" or "[1, 2]".
    """
    if len(dataset) == 0:
        detail = f" (data.limit is {limit})" if limit is not None else ""
        raise DataError(f"data source {source!r} has no records{detail}; check the file, split or filter")
    for name in REQUIRED:
        for i, value in enumerate(dataset[name]):
            scalar = isinstance(value, str | int | float)  # bool is an int: yes/no answers are fine
            if not scalar or (isinstance(value, str) and not value.strip()):
                raise DataError(
                    f"row {i} of {source!r} has {name} {value!r:.80} ({type(value).__name__}); every {name} "
                    "must be a non-empty string or a number: fix or drop that row, or map another column "
                    f"with data.columns"
                )
