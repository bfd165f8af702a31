"""The protocol package is importable with the standard library alone and imports nothing of ours."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import edgekit_protocol

PACKAGE = Path(edgekit_protocol.__file__).parent
MODULES = sorted(f"edgekit_protocol.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE)]))


def test_every_import_in_the_protocol_package_is_the_standard_library_or_itself():
    outside = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "edgekit_protocol":
                    outside.append(f"{path.name}: {name}")
    assert MODULES and not outside, outside


def test_it_imports_in_an_interpreter_without_site_packages():
    # -S: no site-packages at all (no numpy, no PyYAML, no edge_kit); -I: ignore the environment.
    code = f"import sys; sys.path.insert(0, {str(PACKAGE.parent)!r}); " + "; ".join(f"import {m}" for m in MODULES) \
        + "; print(sorted(k for k in sys.modules if k.split('.')[0] in ('numpy', 'yaml', 'edge_kit', 'device_agents')))"
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
