"""The package's import graph against DESIGN.md §1a's layer table: no circle, no import up a layer, no driver
importing a view or a view a driver; every module placed. `python tests/test_layers.py` prints the figures."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (("clbench", "clbench"), ("strategies", "clbench.strategies"), ("benchmarks", "clbench.benchmarks"))


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES:
        for path in (ROOT / folder).glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (module level and inside functions)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name}
    return found


def layer_table() -> dict[str, tuple[int, str]]:
    """DESIGN.md §1a: module pattern -> (layer number, role)."""
    text = (ROOT / "DESIGN.md").read_text()
    section = text[text.index("### 1a. Layers"):]
    out = {}
    for number, role, cells in re.findall(r"^\| (\d) ([^|]+?) \| (.+) \|$", section, flags=re.M):
        for pattern in re.findall(r"`([\w.*]+)`", cells):
            out[pattern] = (int(number), role.strip())
    return out


def placed(name: str, table: dict[str, tuple[int, str]]) -> tuple[int, str] | None:
    if name in table:
        return table[name]
    wildcard = name.rsplit(".", 1)[0] + ".*"
    return table.get(wildcard)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def violations(edges: dict[str, set[str]], table: dict[str, tuple[int, str]]) -> list[str]:
    out = []
    for a in sorted(edges):
        for b in sorted(edges[a]):
            (la, ra), (lb, rb) = placed(a, table), placed(b, table)
            if lb > la:
                out.append(f"{a} (layer {la}) imports {b} (layer {lb}): up a layer")
            elif {ra, rb} == {"drivers", "views"}:
                out.append(f"{a} ({ra}) imports {b} ({rb}): drivers and views never import each other")
    return out


def test_every_module_has_a_layer():
    table = layer_table()
    assert {role for _, role in table.values()} >= {"leaves", "drivers", "views", "command line"}
    unplaced = [name for name in modules() if placed(name, table) is None]
    assert not unplaced, f"add these to DESIGN.md §1a's layer table: {unplaced}"


def test_no_import_circle():
    assert circles(graph()) == []


def test_no_import_up_a_layer_or_between_drivers_and_views():
    assert violations(graph(), layer_table()) == []


def test_the_check_sees_a_violation_when_there_is_one():
    edges = {"clbench.drop": {"clbench.run"}, "clbench.run": {"clbench.page"}, "clbench.page": set()}
    found = violations(edges, layer_table())
    assert found == ["clbench.drop (layer 0) imports clbench.run (layer 3): up a layer",
                     "clbench.run (drivers) imports clbench.page (views): drivers and views never import each other"]
    assert circles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_the_architecture_page_names_every_module_of_the_core():
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("| module of `clbench/` |"):]
    named = set(re.findall(r"`(\w+)\.py`", table[: table.index("\n\n")]))
    assert named == {p.stem for p in (ROOT / "clbench").glob("*.py")} - {"__init__"}


if __name__ == "__main__":
    edges = graph()
    found_circles, found = circles(edges), violations(edges, layer_table())
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports; {len(found_circles)} import circles; "
          f"{len(found)} imports against the layers")
    for line in [*map(str, found_circles), *found]:
        print(" ", line)
