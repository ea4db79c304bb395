"""The package's layers point down: every import between units goes to a lower layer (neuraflex_ray.LAYERS).

A unit is a sub-package or top-level module of neuraflex_ray, or `pipelines/`. Imports inside
functions count (a lazy import is still a dependency), `if TYPE_CHECKING:` ones too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import neuraflex_ray

REPO = Path(__file__).resolve().parents[1]


def unit_of(module: str) -> str | None:
    """'neuraflex_ray.train.loop' -> 'train'; 'pipelines.text' -> 'pipelines'; anything else None."""
    parts = module.split(".")
    if parts[0] == "pipelines":
        return "pipelines"
    if parts[0] == "neuraflex_ray" and len(parts) > 1:
        return parts[1]
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, here: str = "") -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file (module `here`, by default its
    name in the repository), relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = here or module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from neuraflex_ray import console` names the unit in the imported name
            out += [(f"{base}.{a.name}" if base == "neuraflex_ray" else base, node.lineno) for a in node.names]
    return out


def sources() -> list[Path]:
    return sorted([*(REPO / "neuraflex_ray").rglob("*.py"), *(REPO / "pipelines").rglob("*.py")])


def edges() -> list[tuple[str, str, str]]:
    """(from unit, to unit, where) for every import that crosses units."""
    out = []
    for path in sources():
        src = unit_of(module_name(path))
        if src is None:  # the package's own __init__: the layer table itself
            continue
        for target, line in imports(path):
            dst = unit_of(target)
            if dst is not None and dst != src:
                out.append((src, dst, f"{path.relative_to(REPO)}:{line}"))
    return out


LAYER_OF = {unit: i for i, layer in enumerate(neuraflex_ray.LAYERS) for unit in layer}


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in sources()} - {None}
    assert units <= set(LAYER_OF), f"units missing from neuraflex_ray.LAYERS: {sorted(units - set(LAYER_OF))}"


def test_imports_only_point_down():
    bad = [f"{where}: {src} (layer {LAYER_OF[src]}) imports {dst} (layer {LAYER_OF[dst]})"
           for src, dst, where in edges() if LAYER_OF[dst] >= LAYER_OF[src]]
    assert not bad, "imports that do not point down the layers of neuraflex_ray/__init__.py:\n" + "\n".join(bad)


def test_no_cycle_between_units():
    """Implied by the layer order, checked on its own so a broken order table cannot hide a cycle."""
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for v in graph.get(u, ()):
            if state.get(v) == 1:
                pytest.fail(f"import cycle: {' -> '.join([*path[path.index(v):], v])}")
            if v not in state:
                visit(v, [*path, v])
        state[u] = 2

    for u in list(graph):
        if u not in state:
            visit(u, [u])


def test_the_checker_sees_an_upward_import(tmp_path):
    """The parser finds imports in function bodies and resolves relative ones (so the tests above can fail)."""
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    from neuraflex_ray.train import loop\n    from ..serving import app\n"
                 "    from neuraflex_ray import console\n")
    found = {target for target, _ in imports(f, here="neuraflex_ray.config.probe")}
    assert {unit_of(t) for t in found} == {"train", "serving", "console"}
