"""Print hf_quant's import graph between packages (and top-level modules), every import counted, lazy ones too,
and check it against the layering declared in tests/test_architecture.py.

    python scripts/import_graph.py          # edges, package -> packages it imports
    python scripts/import_graph.py --dot    # Graphviz
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hf_quant"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports() -> dict[str, set[str]]:
    """hf_quant module -> hf_quant modules it imports (at any depth of its code)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from pkg import submodule` imports the submodule; `from pkg import name` the package
                candidates = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                while c and c not in modules:
                    c = c.rpartition(".")[0]
                if c.startswith("hf_quant") and c != name:
                    found.add(c)
        graph[name] = found
    return graph


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def unit(module: str) -> str:
    """The layer unit of a module: its subpackage (hf_quant.formats.scalar -> formats) or top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hf_quant"


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for a, targets in graph.items():
        out[unit(a)]
        for b in targets:
            if unit(a) != unit(b):
                out[unit(a)].add(unit(b))
    return dict(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    units = unit_graph(module_imports())
    if "--dot" in sys.argv:
        print("digraph hf_quant {")
        for a, bs in sorted(units.items()):
            for b in sorted(bs):
                print(f'  "{a}" -> "{b}";')
        print("}")
    else:
        for a, bs in sorted(units.items()):
            print(f"{a:14s} -> {', '.join(sorted(bs)) or '-'}")
        print("module cycles:", cycles(module_imports()) or "none")
        print("package cycles:", cycles(units) or "none")
