"""The optional compiled build (tools/compile.py): rules its sources must keep.

mypyc gives a local variable one type for the whole function.  An except
clause's name is a local variable, so `except TableFull as exc` followed by
`except OSError as exc` compiles to a check that the OSError is a TableFull:
the compiled module raises TypeError where the interpreted one logs and goes
on (a ping socket refused by the kernel took a guest frame down that way).
Each name is therefore bound to one exception type per function.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tether import check_compiled_build

ROOT = Path(__file__).resolve().parents[1]


def _compile_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tether_compile", ROOT / "tools" / "compile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tether_compile", module)
    spec.loader.exec_module(module)
    return module


def test_each_except_name_has_one_type_per_function_in_compiled_modules() -> None:
    tool = _compile_tool()
    wrong = []
    for module in tool.HOT_MODULES:
        tree = ast.parse((tool.SRC / module).read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            types: dict[str, set[str]] = {}
            for node in ast.walk(function):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type:
                    types.setdefault(node.name, set()).add(ast.unparse(node.type))
            wrong += [f"{module}:{function.lineno} {function.name}: `{name}` is bound to "
                      f"{' and '.join(sorted(kinds))}"
                      for name, kinds in types.items() if len(kinds) > 1]
    assert not wrong, "\n".join(wrong)


def test_every_compiled_module_exists() -> None:
    tool = _compile_tool()
    missing = [m for m in tool.HOT_MODULES if not (tool.SRC / m).is_file()]
    assert not missing


def test_a_source_edited_after_the_build_stops_the_import(tmp_path: Path) -> None:
    package = tmp_path / "tether"
    (package / "net").mkdir(parents=True)
    source = package / "net" / "tcp.py"
    source.write_text("x = 1\n")
    stamp = {"tether/net/tcp.py": hashlib.sha256(source.read_bytes()).hexdigest()}
    (package / "_compiled.json").write_text(json.dumps(stamp))
    check_compiled_build(package)  # as built: fine
    source.write_text("x = 2\n")
    with pytest.raises(ImportError, match=r"older than tether/net/tcp\.py.*\./dev compile"):
        check_compiled_build(package)
    source.unlink()
    with pytest.raises(ImportError, match=r"older than tether/net/tcp\.py"):
        check_compiled_build(package)
