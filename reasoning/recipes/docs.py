"""The config tables of the docs pages, written from the fields' `metadata["help"]`.

A docs page holds a table between `<!-- config:NAME -->` and `<!-- /config -->`, NAME a trainer of
`TRAINERS` (its recipe section) or `rollout` (the fields every rollout trainer shares,
`RolloutTrainerConfig`). `python -m reasoning.recipes.docs` rewrites every such table from the
dataclasses; `--check` only lists the stale ones (exit code 1), as the test of the docs does, so that
the help a recipe error or `--help` prints and the docs never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from reasoning.recipes.table import TRAINERS
from reasoning.trainers.base import RolloutTrainerConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"
SHARED = "rollout"  # the marker name of the shared RolloutTrainerConfig table
MARKER = re.compile(r"(<!-- config:([\w-]+) -->\n)(.*?)(<!-- /config -->)", re.DOTALL)


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return ""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, list | tuple | dict) and not value:
        return "`[]`" if not isinstance(value, dict) else "`{}`"
    return f"`{value}`" if isinstance(value, list | tuple | dict) else str(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def config_fields(config: type) -> list[dataclasses.Field]:
    """The section's own fields: a rollout trainer's without those of `RolloutTrainerConfig`."""
    shared = (
        {f.name for f in dataclasses.fields(RolloutTrainerConfig)}
        if issubclass(config, RolloutTrainerConfig) and config is not RolloutTrainerConfig
        else set()
    )
    return [f for f in dataclasses.fields(config) if f.init and f.name not in shared]


def config_table(name: str) -> str:
    """The markdown table of section `name` (a trainer, or `rollout`): field, default, meaning."""
    config = RolloutTrainerConfig if name == SHARED else TRAINERS[name].config
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for field in config_fields(config):
        help_text = field.metadata.get("help")
        if not help_text:
            raise ValueError(f"{config.__name__}.{field.name} has no metadata help text")
        rows.append(f"| `{field.name}` | {_cell(_default(field))} | {_cell(help_text)} |")
    if issubclass(config, RolloutTrainerConfig) and config is not RolloutTrainerConfig:
        shared = ", ".join(f"`{f.name}`" for f in dataclasses.fields(RolloutTrainerConfig))
        rows.append(f"| {shared} | | shared by every rollout trainer: docs/grpo.md |")
    return "\n".join(rows) + "\n"


def update_page(text: str) -> str:
    """`text` with every config table rewritten; an unknown section name is a ValueError."""

    def table(match: re.Match[str]) -> str:
        name = match.group(2)
        if name != SHARED and name not in TRAINERS:
            raise ValueError(f"<!-- config:{name} -->: no trainer {name!r}; choose one of {sorted(TRAINERS)}")
        return match.group(1) + config_table(name) + match.group(4)

    return MARKER.sub(table, text)


def tables_in(docs: Path = DOCS) -> dict[str, Path]:
    """Section name -> the page holding its table."""
    found: dict[str, Path] = {}
    for page in sorted(docs.glob("*.md")):
        for match in MARKER.finditer(page.read_text()):
            found[match.group(2)] = page
    return found


def stale_pages(docs: Path = DOCS) -> list[Path]:
    """The pages whose tables differ from the config dataclasses."""
    return [page for page in sorted(docs.glob("*.md")) if update_page(page.read_text()) != page.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reasoning.recipes.docs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--check", action="store_true", help="only list stale pages (exit code 1 if any)")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder (default: the repository's)")
    options = parser.parse_args(argv)
    stale = stale_pages(options.docs)
    for page in stale:
        if not options.check:
            page.write_text(update_page(page.read_text()))
        print(f"{'stale' if options.check else 'updated'}: {page}")
    missing = sorted(set(TRAINERS) - set(tables_in(options.docs)))
    if missing:
        print(
            f"no config table for {', '.join(missing)} (add <!-- config:NAME --> <!-- /config --> to its page)"
        )
    return 1 if (options.check and stale) or missing else 0


if __name__ == "__main__":
    sys.exit(main())
