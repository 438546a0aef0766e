"""The package's shape, checked: layers, private names, and the design document's paths.

import-linter's contracts (``pyproject.toml``) keep imports going down the layers of
``docs/design.md`` and the worker package free of circles; the AST checks below cover
what import-linter does not: private names taken from another module, and backends
reaching into a broker's private fields.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.build_independent   # reads the source: the same in either build's run
ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "stem"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _resolve(path: pathlib.Path, node: ast.ImportFrom) -> str | None:
    """The dotted module a ``from ... import`` names, or None when it is outside stem."""
    if node.level == 0:
        return node.module if node.module and node.module.split(".")[0] == "stem" else None
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts if path.name == "__init__.py" else parts[:-1]
    if path.name == "__init__.py":
        package = parts[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(dotted: str) -> bool:
    target = ROOT.joinpath(*dotted.split("."))
    return target.with_suffix(".py").exists() or (target / "__init__.py").exists()


def test_imports_only_go_down_the_layers_and_the_worker_package_has_no_circle():
    run = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                                                "sys.exit(lint_imports())"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_no_module_imports_a_private_name_of_another_module():
    offences = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = _resolve(path, node)
            if module is None:
                continue
            for alias in node.names:
                name = alias.name
                private = name.startswith("_") and not name.startswith("__")
                if private and not _is_module(f"{module}.{name}"):   # a private submodule is the package's own
                    offences.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}.{name}")
    assert offences == []


def test_backends_read_no_private_field_of_a_broker():
    offences = []
    for path, tree in _modules():
        if "backends" not in path.parts:
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and "broker" in node.value.id.lower()):
                offences.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert offences == []


def test_every_path_the_design_document_names_exists():
    text = (ROOT / "docs" / "design.md").read_text()
    named = set(re.findall(r"`((?:stem|_speedups|tests|benchmarks|docs)/[^`\s]*)`", text))
    assert named, "the design document names no paths"
    missing = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists())
    assert missing == []
