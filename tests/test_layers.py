"""The package's import graph follows DESIGN §3: cli → engine → (teachers, distill, data, eval,
telemetry) → (models, kernels, distributed, config), no layer reaching up, no circles."""

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
