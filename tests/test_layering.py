"""The package's layering (docs/architecture.md): every import of a project module, those inside
functions included, goes to the same layer or one before it, and no modules import each other
in a circle. A pure `ast` walk: nothing is imported, so it runs in well under a second."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

# The declared order, lowest first. A module's layer is its package under pipeline/ (the base
# modules sit directly in it).
LAYERS = ("base", "data", "runtime", "mlperf", "train", "analysis", "cluster", "bench", "cli")


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    if parts[-1] in ("cli", "__main__"):
        return "cli"
    return "base"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports: `from pipeline.x import y` counts as pipeline.x.y
    where that is a module, else as pipeline.x; relative imports resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pipeline":
                continue
            for a in node.names:
                found.add(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target)
    found.discard(name)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    paths = sorted((root / "pipeline").rglob("*.py"))
    known = {module_name(p, root) for p in paths}
    return {module_name(p, root): imports(p, root, known) & known for p in paths}


def against_the_order(g: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})"
            for m, deps in sorted(g.items()) for d in sorted(deps) if rank[layer_of(d)] > rank[layer_of(m)]]


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each once, found by a depth-first walk. A package's __init__
    importing its own modules would count; none does."""
    found, done = [], set()

    def walk(m, path):
        if m in path:
            cycle = path[path.index(m):]
            key = frozenset(cycle)
            if key not in done:
                done.add(key)
                found.append(cycle + [m])
            return
        for d in sorted(g.get(m, ())):
            walk(d, path + [m])

    for m in sorted(g):
        walk(m, [])
    return found


def test_no_import_goes_against_the_layers():
    assert against_the_order(graph(ROOT)) == []


def test_no_import_circle():
    assert circles(graph(ROOT)) == []


def test_every_module_has_a_layer():
    # A new top-level package must be placed in LAYERS (and in docs/architecture.md).
    g = graph(ROOT)
    packages = {m.split(".")[1] for m in g if m.count(".") >= 1 and (ROOT / m.replace(".", "/")).is_dir()}
    assert packages <= set(LAYERS)


@pytest.mark.parametrize("case", ["circle", "against"])
def test_the_walk_catches_what_it_guards_against(tmp_path, case):
    # A tree made by hand: two data modules that import each other, or data importing train.
    pkg = tmp_path / "pipeline"
    (pkg / "data").mkdir(parents=True)
    (pkg / "train").mkdir()
    for p in (pkg, pkg / "data", pkg / "train"):
        (p / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "train" / "step.py").write_text("from pipeline.data import reader\n")
    if case == "circle":
        (pkg / "data" / "reader.py").write_text("from . import feed\nfrom ..errors import UserError\n")
        (pkg / "data" / "feed.py").write_text("def f():\n    from pipeline.data.reader import x\n")
        assert circles(graph(tmp_path)) == [["pipeline.data.feed", "pipeline.data.reader", "pipeline.data.feed"]]
        assert against_the_order(graph(tmp_path)) == []
    else:
        (pkg / "data" / "reader.py").write_text("def f():\n    from pipeline.train import step\n")
        assert against_the_order(graph(tmp_path)) == ["pipeline.data.reader (data) imports pipeline.train.step (train)"]
