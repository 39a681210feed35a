"""The package's import graph: no cycles, and no import from a lower layer to a higher one.

Every ``import`` counts, including those inside functions (a lazy import still couples the two
modules). The layers read bottom-up as the pipeline: foundations, data, models, the per-photo
stages, the index, verification, the answer, orchestration, then the programs around them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cvgl"

#: Module prefixes per layer, lowest first; a module may import its own layer and those below.
LAYERS: list[tuple[str, ...]] = [
    ("cvgl.errors", "cvgl.io", "cvgl.typed", "cvgl.geo", "cvgl.schemas", "cvgl.budget"),
    ("cvgl.data", "cvgl.evaluate.metrics"),
    ("cvgl.models",),
    ("cvgl.preprocess", "cvgl.alignment"),
    ("cvgl.index",),
    ("cvgl.verify", "cvgl.confidence"),
    ("cvgl.answer",),
    ("cvgl.locate", "cvgl.track", "cvgl.street"),
    ("cvgl.evaluate", "cvgl.viz", "cvgl.report"),
    ("cvgl.train",),
    ("cvgl.service", "cvgl.demo"),
    ("cvgl.bench",),
    ("cvgl.cli", "cvgl.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every cvgl module this file imports (``from cvgl.x import y`` counts y when it is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cvgl")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("cvgl"):
                continue
            found.add(base)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").is_file() or (
                    PACKAGE.parent / Path(*candidate.split(".")) / "__init__.py"
                ).is_file():
                    found.add(candidate)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix (``cvgl.evaluate.metrics`` before ``cvgl.evaluate``)."""
    best = (-1, -1)
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), level))
    if best[1] < 0:
        raise AssertionError(f"{module} belongs to no layer; add it to LAYERS in {Path(__file__).name}")
    return best[1]


def test_every_module_has_a_layer() -> None:
    for module in graph():
        if module != "cvgl":
            layer_of(module)


def test_no_import_reaches_up_a_layer() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph().items() if module != "cvgl"
        for target in sorted(targets) if target != "cvgl" and layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    edges = {m: {t for t in ts if t != "cvgl"} for m, ts in graph().items()}
    # A package's __init__ re-exporting its submodules is not a cycle with them.
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and (PACKAGE.parent / Path(*t.split(".")) / "__init__.py").is_file())} for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(("module", "forbidden"), [("cvgl.locate", "cvgl.train"), ("cvgl.service", "cvgl.train"), ("cvgl.index", "cvgl.train")])
def test_inference_never_reaches_into_training(module: str, forbidden: str) -> None:
    """Locating, serving and indexing need no training code, even indirectly."""
    edges = graph()
    seen, todo = set(), [m for m in edges if m == module or m.startswith(module + ".")]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(edges.get(current, ()))
    assert not [m for m in seen if m == forbidden or m.startswith(forbidden + ".")]


def test_the_check_sees_lazy_and_relative_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: an import inside a function, and ``from cvgl.x import module``, count."""
    fake = PACKAGE / "index" / "build.py"
    found = imports(fake)
    assert "cvgl.index.ray_embed" in found  # imported inside build_index
    assert "cvgl.data.tiling" in found
    # An upward import is reported with both layers named.
    assert layer_of("cvgl.index.build") < layer_of("cvgl.bench.run")
    assert layer_of("cvgl.evaluate.metrics") < layer_of("cvgl.models.encoder") < layer_of("cvgl.evaluate.longmont")
