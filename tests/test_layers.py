"""The shape of src/tether: imports run down the layers, and no module imports
itself back through others (TYPE_CHECKING imports count: a cycle there is a
cycle in the design, even when Python never runs it).

Every package sits in one layer; a module may import its own package and any
package of a lower layer, nothing else.  docs/ARCHITECTURE.md draws the same
table.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "tether"

LAYERS: tuple[frozenset[str], ...] = (
    # byte layouts and the loop: no protocol state, no sockets of their own
    frozenset({"wire", "loop", "frames", "state_channel", "ratelimit"}),
    # one concern each, side by side, blind to each other
    frozenset({"transport", "net", "migrate", "repair", "pcap"}),
    # what ties them: the migration handover; options and start-up pieces
    frozenset({"handover", "config", "summary", "spawn"}),
    # the daemon
    frozenset({"cli", "__main__"}),
)
LAYER = {name: height for height, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(module imported, line) for every tether module `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tether":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "tether":
                continue
            for alias in node.names:  # `from tether import loop` imports tether.loop
                submodule = f"{target}.{alias.name}"
                yield (submodule if submodule in known else target), node.lineno


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {target for target, _ in imports(name, path, known) if target != name}
            for name, path in known.items()}


def test_every_package_has_a_layer() -> None:
    tops = {top(name) for name in modules()} - {"__init__"}
    assert tops <= LAYER.keys(), f"give these a layer: {sorted(tops - LAYER.keys())}"


def test_imports_run_down_the_layers() -> None:
    known = modules()
    wrong = []
    for name, path in sorted(known.items()):
        here = top(name)
        if here == "__init__":
            continue
        for target, line in imports(name, path, known):
            there = top(target)
            if there in (here, "__init__"):
                continue
            if LAYER[there] >= LAYER[here]:
                wrong.append(f"{path.relative_to(SRC)}:{line}: {here} (layer {LAYER[here]}) "
                             f"imports {target} (layer {LAYER[there]})")
    assert not wrong, "imports that do not run down a layer:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
