"""The package's import graph: no circles, and only the CLI imports the CLI.

Every ``import`` and ``from ... import`` in every module counts, including
those inside functions (a lazy import is still a dependency); only imports
under ``if TYPE_CHECKING:`` are left out, because they never run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "streamstore"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports (resolved to modules, not names)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        # the longest module prefix: `a.b.c` where `c` is a class resolves to `a.b`
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "streamstore":
                        found.add(resolve(alias.name))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".")
                    if not is_package:
                        base = base[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                if module.split(".")[0] != "streamstore":
                    continue
                for alias in child.names:
                    # `from pkg import submodule` depends on the submodule
                    sub = f"{module}.{alias.name}"
                    found.add(sub if sub in modules else resolve(module))
            visit(child)

    visit(ast.parse(path.read_text("utf-8"), str(path)))
    found.discard(None)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_graph_sees_lazy_imports():
    # the walker must see function-local imports, or the checks below prove nothing
    graph = _graph()
    assert "streamstore.store._kernels" in graph["streamstore.store.codec"]
    assert "streamstore.link.protocol" in graph["streamstore.ingest.machine"]


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_only_the_cli_imports_the_cli():
    offenders = sorted(
        f"{name} imports {dep}"
        for name, deps in _graph().items()
        if not (name == "streamstore.cli" or name.startswith("streamstore.cli."))
        and name != "streamstore.__main__"
        for dep in deps
        if dep == "streamstore.cli" or dep.startswith("streamstore.cli.")
    )
    assert not offenders, offenders


# ------------------------------------------------------------------ layers --
#: The stages from the bottom up (docs/architecture.md, "Rules of the house"): a
#: module may import its own stage and any stage of a lower layer; stages of one
#: layer import each other only where they are named peers below.
SHARED = {"streamstore", "abc", "errors", "events", "idranges", "scan", "shapes", "_numba_cache"}
LAYERS: list[set[str]] = [
    SHARED,
    {"camera", "link", "store"},
    {"counting"},
    {"ingest", "scaleout"},
    {"analysis", "exports"},
    {"cli", "__main__"},
]
#: stages of one layer that may import each other
PEERS = [SHARED, {"ingest", "scaleout"}, {"analysis", "exports"}, {"cli", "__main__"}]


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _layer(stage: str) -> int:
    for k, layer in enumerate(LAYERS):
        if stage in layer:
            return k
    raise AssertionError(f"stage {stage!r} is in no layer: add it to LAYERS and the doc")


def _layer_offenders(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for name, deps in graph.items():
        src = _stage(name)
        for dep in deps:
            dst = _stage(dep)
            if src == dst or _layer(dst) < _layer(src):
                continue
            if _layer(dst) == _layer(src) and any({src, dst} <= p for p in PEERS):
                continue
            out.append(f"{name} imports {dep}")
    return sorted(out)


def test_every_stage_has_a_layer():
    for name in _modules():
        _layer(_stage(name))


def test_imports_point_down_the_layers():
    offenders = _layer_offenders(_graph())
    assert not offenders, "imports against the layer order: " + "; ".join(offenders)


def test_layer_check_finds_an_upward_import():
    graph = {
        "streamstore.store.reader": {"streamstore.analysis.stem"},
        "streamstore.link.sockets": {"streamstore.store.reader"},
        "streamstore.analysis.stem": {"streamstore.store.reader", "streamstore.exports.eer"},
    }
    assert _layer_offenders(graph) == [
        "streamstore.link.sockets imports streamstore.store.reader",
        "streamstore.store.reader imports streamstore.analysis.stem",
    ]


def test_the_doc_states_the_layers():
    # the table "| layer | stages |" of docs/architecture.md lists LAYERS[1:]
    doc = (ROOT / "docs" / "architecture.md").read_text("utf-8")
    rows = re.findall(r"^\s*\| (\d) \| (.*) \|$", doc, flags=re.M)
    stated = {int(k): set(re.findall(r"`(\w+)/`", text)) for k, text in rows if k != "0"}
    assert stated == {k: layer - {"__main__"} for k, layer in enumerate(LAYERS) if k}
    marked = {int(k) for k, text in rows if k != "0" and "(peers)" in text}
    assert marked == {_layer(next(iter(p))) for p in PEERS[1:] if len(p - {"__main__"}) > 1}


def test_store_methods_forwarded_to_analysis_exist():
    # store/ reaches analysis/ by name (analysis_function), which the import walk
    # above cannot see: every name so forwarded must exist
    import importlib

    for path in (PACKAGE / "store").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "analysis_function"
            ):
                module, name = (a.value for a in node.args)
                target = importlib.import_module(f"streamstore.analysis.{module}")
                assert callable(getattr(target, name, None)), f"{path.name}: {module}.{name}"


# ------------------------------------------------------------------- sizes --
MAX_LINES = 600
#: modules still over MAX_LINES, each with the most lines it may keep until split;
#: an entry may only shrink, and goes once its module is under MAX_LINES
OVERSIZED: dict[str, int] = {}


def test_no_module_over_600_lines():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        n = len(path.read_text("utf-8").splitlines())
        if n > OVERSIZED.get(rel, MAX_LINES):
            too_long.append(f"{rel}: {n} lines")
    assert not too_long, f"modules over {MAX_LINES} lines (split along a seam): {too_long}"


def test_the_oversized_list_is_current():
    stale = [
        rel
        for rel in OVERSIZED
        if not (ROOT / rel).is_file()
        or len((ROOT / rel).read_text("utf-8").splitlines()) <= MAX_LINES
    ]
    assert not stale, f"under {MAX_LINES} lines now, drop from OVERSIZED: {stale}"
