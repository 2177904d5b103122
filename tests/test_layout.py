"""The package's import rules (STYLE.md): imports run one way (no cycle in the import graph of sdjax/, function-level
imports included) and no module imports another module's private (`_name`) names."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdjax"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> sdjax modules it imports anywhere in its file, [private imports as 'module: name from other'])."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph, private = {}, []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges, aliases = set(), {}  # aliases: local name -> the sdjax module it is bound to
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
                aliases.update({alias.asname: alias.name for alias in node.names if alias.asname})
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append((sub, None) if sub in modules else (base, alias.name))
                    if sub in modules:
                        aliases[alias.asname or alias.name] = sub
            else:
                continue
            for target, imported in targets:
                if not target.startswith("sdjax"):
                    continue
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target != name:
                    edges.add(target)
                if imported and imported.startswith("_") and not imported.startswith("__"):
                    private.append(f"{name}: {imported} from {target}")
        for node in ast.walk(tree):  # `module._name` through an imported module
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id].startswith("sdjax")):
                private.append(f"{name}: {node.attr} from {aliases[node.value.id]}")
        graph[name] = edges
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_has_no_cycle():
    graph, _ = import_graph()
    assert "sdjax.pipelines.program" in graph and graph["sdjax.cli"]  # the parse found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_imported_across_modules():
    _, private = import_graph()
    assert private == []


def test_lower_layers_never_import_higher_ones():
    graph, _ = import_graph()
    models = [m for m in graph if m.startswith("sdjax.models")]
    for m in models:
        assert not {t for t in graph[m] if t.startswith(("sdjax.pipelines", "sdjax.cli", "sdjax.bulk", "sdjax.demo",
                                                          "sdjax.app", "sdjax.rerank", "sdjax.train"))}, m
    for m in ("sdjax.rerank", "sdjax.train", "sdjax.samplers", "sdjax.loading", "sdjax.distributed"):
        assert not {t for t in graph[m] if t.startswith(("sdjax.pipelines", "sdjax.cli", "sdjax.demo",
                                                         "sdjax.bulk"))}, m


def test_the_checker_sees_cycles_and_private_imports(tmp_path):
    """The rules above can fail: a tree with a function-level cycle and a private import is caught."""
    pkg = tmp_path / "sdjax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from sdjax.b import _helper\n")
    (pkg / "b.py").write_text("def _helper():\n    from sdjax import a as m\n    return m._x\n")
    graph, private = import_graph(pkg)
    assert find_cycle(graph) in (["sdjax.a", "sdjax.b", "sdjax.a"], ["sdjax.b", "sdjax.a", "sdjax.b"])
    assert sorted(private) == ["sdjax.a: _helper from sdjax.b", "sdjax.b: _x from sdjax.a"]
