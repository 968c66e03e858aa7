"""The docs agree with the code: config tables written from the fields' help text, and every
repository path a docstring, docs page or recipe names exists (the method notes are in `docs/methods/`)."""

import re
import shutil
from pathlib import Path

from reasoning.recipes import TRAINERS
from reasoning.recipes.docs import SHARED, config_table, main, stale_pages, tables_in, update_page
from reasoning.trainers.grpo import GRPOConfig

ROOT = Path(__file__).resolve().parents[2]
# A path inside the repository: docs/…, reasoning/…, recipes/…, tests/…, benchmarks/… (globs allowed).
PATH = re.compile(r"(?<![\w./-])((?:docs|reasoning|recipes|tests|benchmarks)/[\w./*-]*[\w/*])")
METHOD_NOTES = (
    "covrl",
    "gflownet",
    "kl_bayes",
    "latent_thought",
    "variational_reasoning",
    "rl_baselines_and_eval",
)


def texts() -> list[Path]:
    """Docstrings and comments (the package's sources), the docs pages, the README and the recipes."""
    return [
        *sorted((ROOT / "reasoning").rglob("*.py")),
        *sorted((ROOT / "docs").rglob("*.md")),
        ROOT / "README.md",
        *sorted((ROOT / "recipes").rglob("*.yaml")),
    ]


def test_every_trainer_has_an_up_to_date_config_table():
    pages = tables_in()
    assert set(pages) == {*TRAINERS, SHARED}, f"config tables: {sorted(pages)}; trainers: {sorted(TRAINERS)}"
    stale = stale_pages()
    assert not stale, (
        f"config tables out of date in {[str(p.relative_to(ROOT)) for p in stale]}: run "
        "`python -m reasoning.recipes.docs` (the tables are written from the fields' metadata help)"
    )


def test_a_table_is_the_help_text_and_a_stale_one_is_found_and_rewritten(tmp_path):
    table = config_table("grpo")
    for field in ("loss_type", "beta", "epsilon"):
        help_text = " ".join(GRPOConfig.__dataclass_fields__[field].metadata["help"].split())
        assert f"| `{field}` |" in table and help_text.replace("|", "\\|") in table
    assert "| `num_generations` |" not in table  # shared fields: the `rollout` table
    assert "| `num_generations` |" in config_table(SHARED)
    page = "intro\n<!-- config:grpo -->\n| old | table |\n<!-- /config -->\noutro\n"
    assert update_page(page) == f"intro\n<!-- config:grpo -->\n{table}<!-- /config -->\noutro\n"
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    main(["--docs", str(docs)])  # the copy up to date, whatever the state of the real pages
    grpo = docs / tables_in(docs)["grpo"].name
    grpo.write_text(grpo.read_text().replace(table, table.replace("| `beta` |", "| `beta` | 1.0 (old) |")))
    assert stale_pages(docs) == [grpo]
    assert main(["--check", "--docs", str(docs)]) == 1
    assert main(["--docs", str(docs)]) == 0 and stale_pages(docs) == []


def test_every_path_named_in_docs_and_docstrings_exists():
    missing = []
    for path in texts():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in PATH.finditer(line):
                named = match.group(1)
                if not any(ROOT.glob(named)) and not (ROOT / named).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {named}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


def test_method_notes_are_in_the_repository_and_named_by_their_path():
    for note in METHOD_NOTES:
        assert (ROOT / "docs" / "methods" / f"{note}.md").is_file(), note
    wrong = []
    for path in texts():
        if path.is_relative_to(ROOT / "docs" / "methods"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # `methods/x.md` must be `docs/methods/x.md`; nothing may point outside the repository
            if re.search(r"(?<!docs/)\bmethods/\w+\.md", line) or "shared/" in line:
                wrong.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not wrong, (
        "method notes named without their docs/ path, or paths outside the repository:\n" + "\n".join(wrong)
    )
