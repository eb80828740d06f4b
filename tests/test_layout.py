"""The package layout: no import cycle inside runlora_fx, function-level imports included."""

from __future__ import annotations

import ast
import pathlib

import runlora_fx

PACKAGE = pathlib.Path(runlora_fx.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = ("runlora_fx",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set) -> set:
    """Every runlora_fx module ``name`` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "runlora_fx")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "runlora_fx":
                continue
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if child in known else source)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict) -> list:
    """One import cycle as [a, b, ..., a], or [] when the graph is acyclic."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_relative_and_function_level_imports():
    graph = import_graph()
    assert "runlora_fx.plans" in graph["runlora_fx.ops.dense"]
    assert "runlora_fx.choose.roofline" in graph["runlora_fx.cli"]  # imported inside a function


def test_no_import_cycle_inside_the_package():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_downward():
    """plans <- options <- ops <- choose <- inspection <- passes <- front doors."""
    graph = import_graph()
    layer_of = {"plans": 0, "options": 1, "ops": 2, "choose": 3, "inspection": 4, "passes": 5}
    for module, deps in graph.items():
        top = module.split(".")[1] if "." in module else ""
        if top not in layer_of:
            continue
        for dep in deps:
            dep_top = dep.split(".")[1] if "." in dep else ""
            if dep_top == "_compat" or dep_top == top:
                continue
            assert dep_top in layer_of and layer_of[dep_top] < layer_of[top], f"{module} imports {dep}"
    assert graph["runlora_fx.inspection.report"] == set()
