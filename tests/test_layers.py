"""The package's import graph follows DESIGN §3: cli → engine → (teachers, distill, data, eval,
telemetry) → (models, kernels, distributed, config), no layer reaching up, no circles: neither
between layers nor between modules (inside a package too). Every import counts: lazy (in-function)
ones and those under ``TYPE_CHECKING`` alike."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYER_RANK = {
    "cli": 4,
    "engine": 3,
    "teachers": 2, "distill": 2, "data": 2, "eval": 2, "telemetry": 2,
    "models": 1, "kernels": 1, "distributed": 1, "config": 1, "files": 1, "object_store": 1, "safe_load": 1,
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "kernels":
        return "kernels"
    if parts[0] != "dune_scale" or len(parts) < 2 or parts[1] == "__init__":
        return None  # dune_scale/__init__.py is the user-facing facade above every layer (lazy imports)
    return parts[1]


def _package_imports() -> dict[tuple[str, str], list[str]]:
    """(importing layer, imported layer) → the import statements, lazy (in-function) ones included."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted([*REPO.glob("dune_scale/**/*.py"), *REPO.glob("kernels/**/*.py")]):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        source = _layer(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names if node.module == "dune_scale"]
            else:
                continue
            for target in targets:
                layer = _layer(target)
                if layer is not None and source is not None and layer != source and layer in LAYER_RANK:
                    edges.setdefault((source, layer), []).append(f"{path.relative_to(REPO)}:{node.lineno} imports {target}")
    return edges


def test_every_package_is_placed_in_a_layer() -> None:
    packages = {p.parent.name for p in REPO.glob("dune_scale/*/__init__.py")} | {
        p.stem for p in REPO.glob("dune_scale/*.py") if p.stem != "__init__"
    }
    assert packages <= set(LAYER_RANK), f"place these in LAYER_RANK (DESIGN §3): {sorted(packages - set(LAYER_RANK))}"


def test_no_layer_imports_a_higher_one() -> None:
    upward = [
        line
        for (source, target), lines in _package_imports().items()
        if LAYER_RANK[target] > LAYER_RANK[source]
        for line in lines
    ]
    assert not upward, "imports that reach up a layer:\n" + "\n".join(upward)


def test_no_import_circles_between_packages() -> None:
    edges = _package_imports()
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
    circles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                circles.append(" → ".join(path[path.index(nxt):] + [nxt]))
            elif len(path) < len(LAYER_RANK):
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles)))


def _module_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(root: Path = REPO) -> dict[str, dict[str, str]]:
    """module → {imported module of ours: the first import statement saying so}. ``from P import N``
    imports module ``P.N`` when that is a module, else ``P`` itself; relative imports are resolved."""
    paths = {_module_of(p, root): p for p in sorted([*root.glob("dune_scale/**/*.py"), *root.glob("kernels/**/*.py")])}

    def ours(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges: dict[str, str] = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base for alias in node.names]
            else:
                continue
            for target in targets:
                found = ours(target)
                if found is not None and found != module:
                    edges.setdefault(found, f"{path.relative_to(root)}:{node.lineno}")
        graph[module] = edges
    return graph


def _circles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = [stack.pop()]
            while component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles_between_modules() -> None:
    graph = _module_imports()
    lines = []
    for component in _circles(graph):
        lines.append(" ↔ ".join(component))
        lines += [f"    {graph[a][b]} imports {b}" for a in component for b in component if b in graph[a]]
    assert not lines, "import circles between modules:\n" + "\n".join(lines)


def test_the_module_check_sees_lazy_type_checking_and_relative_imports(tmp_path: Path) -> None:
    """The circle check is only as good as the edges it sees: the circle batching ↔ dataset that
    data/ had (its return edge only under TYPE_CHECKING), one through a lazy relative import, and
    ``from package import module`` are all found; a package's own ``__init__`` is a module too."""
    files = {
        "dune_scale/__init__.py": "",
        "dune_scale/data/__init__.py": "",
        "dune_scale/data/batching.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dune_scale.data.dataset import D\n",
        "dune_scale/data/dataset.py": "from dune_scale.data.batching import GROUPED\n",
        "dune_scale/eval/__init__.py": "from dune_scale.eval import knn\n",
        "dune_scale/eval/knn.py": "def probe():\n    from . import registry\n",
        "dune_scale/eval/registry.py": "from .knn import probe\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = _module_imports(tmp_path)
    assert graph["dune_scale.eval"] == {"dune_scale.eval.knn": "dune_scale/eval/__init__.py:1"}
    assert _circles(graph) == [["dune_scale.data.batching", "dune_scale.data.dataset"],
                               ["dune_scale.eval.knn", "dune_scale.eval.registry"]]
