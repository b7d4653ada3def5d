"""The package's rooms keep their walls (issue 19): no module reaches into another's underscore
names, the runtime never imports the testing helpers, the protocol layer depends on nothing
else, and no module grows past ~500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "proxy"
MODULES = sorted(p for p in ROOT.rglob("*.py"))
STDLIB_PRIVATE = {("os", "_exit")}  # documented stdlib names that happen to start with _


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_module_uses_another_objects_underscore_names():
    found = []
    for path in MODULES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                v = node.value
                if isinstance(v, ast.Name) and (v.id in ("self", "cls") or (v.id, node.attr) in STDLIB_PRIVATE):
                    continue
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxy"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: imports {node.module}.{a.name}")
    assert not found, "\n".join(found)


def test_the_runtime_never_imports_the_testing_helpers():
    found = [f"{_name(p)} imports {m}" for p in MODULES if not _name(p).startswith("proxy.testing")
             for m in _imports(ast.parse(p.read_text())) if m.startswith("proxy.testing")]
    assert not found, found


def test_the_protocol_layer_depends_on_nothing_else_in_proxy():
    found = [f"{_name(p)} imports {m}" for p in MODULES if _name(p).startswith("proxy.protocol")
             for m in _imports(ast.parse(p.read_text())) if m.startswith("proxy.") and not m.startswith("proxy.protocol")]
    assert not found, found


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_every_package_says_what_it_owns():
    missing = [str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("__init__.py") if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, missing
