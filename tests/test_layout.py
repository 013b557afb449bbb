"""The code's shape: no function over 80 lines and no import cycle in the package, convert/ and cli/."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREES = ("cumo_mlx", "convert", "cli")  # convert/ and cli/ ship as cumo_mlx.convert and cumo_mlx.cli


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts = ["cumo_mlx", *parts] if parts[0] != "cumo_mlx" else parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(f): f for tree in TREES for f in (ROOT / tree).rglob("*.py")}


def imported(name: str, path: Path, known: dict) -> set:
    """The package's modules `name` imports, function-level imports included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            subs = {f"{source}.{alias.name}" for alias in node.names} & set(known)
            found |= subs if len(subs) == len(node.names) else subs | {source}  # `from . import x` is x alone
    return (found & set(known)) - {name}


def cycle(graph: dict) -> list:
    """One import cycle of `graph` (module -> imported modules), or []."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_cycle():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert cycle(graph) == []


def test_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_function_over_80_lines():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in modules().values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []
