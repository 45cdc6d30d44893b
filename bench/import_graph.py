"""The import graph of the `mistral4_jax` package: modules, edges, circles, imports inside functions.

    python bench/import_graph.py            # figures, then the layers (each module's depth) and any circle

Every intra-package import counts, at module level or inside a function (`from .x import y`, `from ..x import y`,
`import mistral4_jax.x`, `from mistral4_jax.x import y`); `from . import x` counts as an edge to the submodule x
when x is a module. An edge into a package means its `__init__`. The CLI imports lazily on purpose (so that
`--help` starts fast): its function-level imports are reported apart.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "mistral4_jax"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PKG).rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, level: int, name: str | None) -> str:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def edges(mods: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every intra-package import."""
    out = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        func_nodes = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                func_nodes.update(id(n) for n in ast.walk(node) if n is not node)
        for node in ast.walk(tree):
            inside = id(node) in func_nodes
            targets = []
            if isinstance(node, ast.ImportFrom):
                src = _resolve(mod, is_pkg, node.level, node.module) if node.level else (node.module or "")
                if not (src == PKG or src.startswith(PKG + ".")):
                    continue
                subs = [f"{src}.{a.name}" for a in node.names if f"{src}.{a.name}" in mods]
                targets = subs if subs and len(subs) == len(node.names) else [src] + subs
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name == PKG or a.name.startswith(PKG + ".")]
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod:
                    out.append((mod, t, inside))
    return out


def circles(mods, es) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {m: sorted({b for a, b, _ in es if a == m}) for m in mods}
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
    for m in mods:
        if m not in index:
            visit(m)
    return out


def depths(mods, es) -> dict[str, int]:
    graph = {m: {b for a, b, _ in es if a == m} for m in mods}
    memo: dict[str, int] = {}

    def depth(m, seen=()):
        if m in memo:
            return memo[m]
        if m in seen:
            return 0
        memo[m] = d = 1 + max((depth(x, seen + (m,)) for x in graph[m]), default=-1)
        return d

    return {m: depth(m) for m in mods}


def report() -> dict:
    mods = modules()
    es = edges(mods)
    unique = {(a, b) for a, b, _ in es}
    inside = [(a, b) for a, b, f in es if f]
    lib_inside = [(a, b) for a, b in inside if a != f"{PKG}.cli"]
    convert_imports = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            convert_imports += [(mod, x) for x in names if x == "convert" or x.startswith("convert.")]
    return {"modules": len(mods), "edges": len(unique), "circles": circles(mods, es),
            "imports_in_functions": len(inside), "imports_in_functions_outside_cli": lib_inside,
            "imports_of_convert": convert_imports, "layers": 1 + max(depths(mods, es).values())}


if __name__ == "__main__":
    r = report()
    print(f"modules {r['modules']}, edges {r['edges']}, circles {len(r['circles'])}, layers {r['layers']}, "
          f"imports inside functions {r['imports_in_functions']} "
          f"({len(r['imports_in_functions_outside_cli'])} outside cli.py), imports of `convert` {len(r['imports_of_convert'])}")
    for c in r["circles"]:
        print("circle:", " <-> ".join(c))
    for a, b in r["imports_in_functions_outside_cli"]:
        print(f"inside a function: {a} -> {b}")
    for a, b in r["imports_of_convert"]:
        print(f"imports convert: {a} -> {b}")
