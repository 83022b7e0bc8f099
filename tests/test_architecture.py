"""The package's layout rules, read from the source with `ast` (nothing is imported):

- training code (the module, its outputs, the losses, the models, the data) depends on nothing from the
  evaluation, callback, grid or report rooms, directly or through another module, lazy imports inside
  functions included: a training run must not need them, and changing them must not change training;
- no import cycle among the package's modules (lazy imports count: a cycle that only works because one
  side imports late breaks as soon as someone moves that import to the top);
- no file over `MAX_LINES` lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "lightning_clip"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 450
#: training code, as module-name prefixes
TRAINING = ("lightning_clip.module", "lightning_clip.outputs", "lightning_clip.losses", "lightning_clip.models",
            "lightning_clip.data")
#: the rooms training code must not reach
FORBIDDEN = ("lightning_clip.eval", "lightning_clip.callbacks", "lightning_clip.grid", "lightning_clip.report")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def in_room(name: str, rooms: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in rooms)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (top level, functions, classes)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            # `from P import n` imports the submodule P.n when there is one, else a name defined in P
            targets = [f"{parent}.{a.name}" if f"{parent}.{a.name}" in known else parent for a in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` where only a.b is a module of ours (c a name): the longest known prefix
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith(PACKAGE):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def path_to_forbidden(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest import chain from ``start`` to a module of a forbidden room, or None."""
    prev: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        if v != start and in_room(v, FORBIDDEN):
            chain = [v]
            while prev[chain[-1]] is not None:
                chain.append(prev[chain[-1]])
            return chain[::-1]
        for w in sorted(graph.get(v, ())):
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return None


# -- the checker itself, on hand-made graphs and sources --------------------------------------------------
def test_cycle_finder_on_a_hand_made_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_are_found_in_functions_and_relative_forms(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom . import sib\nfrom .pkg import thing\n"
                   "def f():\n    from lightning_clip.eval.retrieval import x\n    import lightning_clip.grid.y.z\n")
    known = {"lightning_clip.a.m", "lightning_clip.a.sib", "lightning_clip.a.pkg", "lightning_clip.eval.retrieval",
             "lightning_clip.grid.y"}
    assert imports_of("lightning_clip.a.m", src, known) == {
        "lightning_clip.a.sib", "lightning_clip.a.pkg", "lightning_clip.eval.retrieval", "lightning_clip.grid.y"}
    graph = {"lightning_clip.module": {"lightning_clip.dedup"}, "lightning_clip.dedup": {"lightning_clip.eval.x"}}
    assert path_to_forbidden(graph, "lightning_clip.module") == [
        "lightning_clip.module", "lightning_clip.dedup", "lightning_clip.eval.x"]


# -- the package ------------------------------------------------------------------------------------------
def test_the_package_is_found():
    mods = modules()
    assert {"lightning_clip.module", "lightning_clip.losses", "lightning_clip.eval.retrieval"} <= set(mods)
    assert any(in_room(m, TRAINING) for m in mods) and any(in_room(m, FORBIDDEN) for m in mods)


def test_training_code_does_not_depend_on_evaluation_callbacks_grid_or_report():
    graph = import_graph()
    bad = [" -> ".join(chain) for m in sorted(graph) if in_room(m, TRAINING)
           for chain in [path_to_forbidden(graph, m)] if chain]
    assert not bad, "training code reaches a room it must not:\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (lazy imports included):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_file_over_the_line_limit():
    long = {str(p.relative_to(ROOT.parent)): n for p in sorted(ROOT.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


#: rooms outside training code and what each must not import directly (README, "Architecture")
NOT_DIRECTLY = {
    "lightning_clip.eval": ("lightning_clip.callbacks", "lightning_clip.grid", "lightning_clip.report",
                            "lightning_clip.cli"),
    "lightning_clip.callbacks": ("lightning_clip.grid", "lightning_clip.report", "lightning_clip.cli"),
    "lightning_clip.report": ("lightning_clip.grid", "lightning_clip.callbacks", "lightning_clip.cli",
                              "lightning_clip.module", "lightning_clip.losses", "lightning_clip.models"),
    # the runner drives runs as processes: it builds no model, loss or data module itself
    "lightning_clip.grid": ("lightning_clip.module", "lightning_clip.losses", "lightning_clip.models",
                            "lightning_clip.data", "lightning_clip.callbacks"),
}


def test_each_room_imports_only_what_the_readme_allows():
    graph = import_graph()
    bad = [f"{m} -> {t}" for m, targets in sorted(graph.items()) for room, banned in NOT_DIRECTLY.items()
           if in_room(m, (room,)) for t in sorted(targets) if in_room(t, banned)]
    assert not bad, "direct imports across rooms that the README's architecture table forbids:\n" + "\n".join(bad)
