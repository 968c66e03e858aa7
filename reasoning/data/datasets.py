"""Load training and evaluation records with canonical columns: question, answer, solution.

Sources: a Hugging Face dataset name (for users; needs the network), a local `.jsonl`,
`.json` or `.parquet` file, or an embedded synthetic task spec `synthetic:TASK?key=value&...`.
`columns` maps the canonical names to the source's own column names.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset

from reasoning.data.synthetic import records_from_spec

REQUIRED = ("question", "answer")
OPTIONAL = ("solution",)
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _load_source(source: str, split: str) -> Dataset:
    if source.startswith("synthetic:"):
        return Dataset.from_list(records_from_spec(source.removeprefix("synthetic:")))
    path = Path(source)
    if path.suffix in FILE_FORMATS or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"data file {source!r} does not exist")
        if path.suffix not in FILE_FORMATS:
            raise ValueError(
                f"unsupported data file {source!r}; supported extensions: {', '.join(FILE_FORMATS)}"
            )
        return load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
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
        raise ValueError(f"column mapping keys {unknown} are not canonical names; use {REQUIRED + OPTIONAL}")
    dataset = _load_source(source, split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    available = list(dataset.column_names)
    renames = {}
    for name in REQUIRED + OPTIONAL:
        origin = columns.get(name, name)
        if origin not in available:
            if name in REQUIRED:
                raise ValueError(
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
    return dataset.map(lambda row: {"question": str(row["question"]), "answer": str(row["answer"])})
