"""Which build runs: ``stem._native`` decides and reports it, the ``twin`` fixture never
lets a missing compiled build pass quietly."""

from __future__ import annotations

import ast
import fnmatch
import importlib
import inspect
import re
import tomllib
from pathlib import Path

import pytest

import stem
from stem import _native, envelope, signing
from stem.worker import channel as worker_ring

from .conftest import EXPECT_COMPILED, load_twin, require_compiled_in_use

TESTS = Path(__file__).parent


def _missing(name):
    raise ImportError(f"No module named 'stem._speedups.{name}' (simulated failed C build)")


# ---- stem._native -----------------------------------------------------------------------

def test_every_implementation_constant_is_the_one_native_reports():
    assert stem.IMPLEMENTATION == _native.implementation() in (_native.COMPILED, _native.PURE)
    assert envelope.IMPLEMENTATION == _native.implementation("codec")
    assert signing.IMPLEMENTATION == _native.implementation("signer")
    assert worker_ring.IMPLEMENTATION == _native.implementation("ring")


@pytest.mark.parametrize("name", _native.MODULES)
def test_the_reported_build_is_the_module_in_use(name):
    in_use = _native.load(name)
    if _native.implementation(name) == _native.COMPILED:
        assert in_use is _native.compiled(name)
    else:
        assert in_use is _native.pure(name)


@pytest.mark.skipif(not EXPECT_COMPILED or _native.FORCED_PURE,
                    reason="compiled build not expected (STEM_EXPECT_COMPILED unset or STEM_PURE=1)")
def test_compiled_build_is_loaded_when_expected():
    builds = {name: _native.implementation(name) for name in _native.MODULES}
    assert set(builds.values()) == {_native.COMPILED}, (
        f"STEM_EXPECT_COMPILED=1 but not every module is compiled ({builds}); run `make build`")
    assert stem.IMPLEMENTATION == _native.COMPILED


@pytest.mark.skipif(not _native.FORCED_PURE, reason="only under STEM_PURE=1")
def test_pure_build_is_forced_by_stem_pure():
    assert {_native.implementation(name) for name in _native.MODULES} == {_native.PURE}
    assert stem.IMPLEMENTATION == _native.PURE
    assert envelope.IMPLEMENTATION == signing.IMPLEMENTATION == worker_ring.IMPLEMENTATION == _native.PURE


def test_a_missing_compiled_module_falls_back_to_its_twin_with_one_warning(monkeypatch):
    monkeypatch.setattr(_native, "FORCED_PURE", False)
    monkeypatch.setattr(_native, "_warned", False)
    monkeypatch.setattr(_native, "_chosen", {})
    monkeypatch.setattr(_native, "compiled", _missing)
    with pytest.warns(RuntimeWarning, match="pure-Python implementation") as record:
        codec = _native.load("codec")
        signer = _native.load("signer")
    assert codec is _native.pure("codec") and signer is _native.pure("signer")
    assert len(record) == 1
    assert _native.implementation("codec") == _native.PURE
    assert _native.implementation() == _native.PURE


def test_the_whole_build_is_compiled_only_when_every_module_is(monkeypatch):
    monkeypatch.setattr(_native, "_chosen", dict.fromkeys(_native.MODULES, _native.COMPILED))
    assert _native.implementation() == _native.COMPILED
    _native._chosen["resp"] = _native.PURE
    assert _native.implementation() == _native.PURE
    assert _native.implementation("codec") == _native.COMPILED


def test_an_unknown_module_name_is_refused():
    for lookup in (_native.load, _native.compiled, _native.pure, _native.implementation):
        with pytest.raises(ValueError, match="unknown hot-path module 'codex'"):
            lookup("codex")


# ---- the twin fixture -------------------------------------------------------------------

def test_the_twin_fixture_fails_when_the_compiled_build_was_expected_and_is_missing():
    with pytest.raises(pytest.fail.Exception, match="STEM_EXPECT_COMPILED=1 but the compiled build does not"):
        load_twin("c", expect_compiled=True, import_compiled=_missing)


def test_the_twin_fixture_skips_with_a_reason_when_the_compiled_build_is_missing():
    with pytest.raises(pytest.skip.Exception, match="only the pure twin is tested"):
        load_twin("c", expect_compiled=False, import_compiled=_missing)


def test_the_twin_fixture_fails_when_only_one_compiled_module_is_missing():
    def resp_missing(name):
        return _missing(name) if name == "resp" else importlib.import_module(f"stem._{name}_py")

    with pytest.raises(pytest.fail.Exception, match=r"stem\._speedups\.resp"):
        load_twin("c", expect_compiled=True, import_compiled=resp_missing)


def test_the_pure_twin_always_loads():
    py = load_twin("py", expect_compiled=True, import_compiled=_missing)
    assert py.id == "py"
    assert [getattr(py, name) for name in _native.MODULES] == [_native.pure(name) for name in _native.MODULES]


def test_the_twin_fixture_gives_the_compiled_modules(compiled_twin):
    assert compiled_twin.id == "c"
    for name in _native.MODULES:
        assert getattr(compiled_twin, name) is _native.compiled(name)


def test_a_test_of_the_compiled_ring_in_use_fails_when_it_was_expected(monkeypatch):
    monkeypatch.setattr(_native, "FORCED_PURE", False)
    monkeypatch.setattr(_native, "_chosen", {"ring": _native.PURE})
    with pytest.raises(pytest.fail.Exception, match="STEM_EXPECT_COMPILED=1 but stem runs the pure ring"):
        require_compiled_in_use("ring", expect_compiled=True)
    with pytest.raises(pytest.skip.Exception, match="compiled ring does not load"):
        require_compiled_in_use("ring", expect_compiled=False)
    monkeypatch.setattr(_native, "FORCED_PURE", True)
    with pytest.raises(pytest.skip.Exception, match="STEM_PURE=1"):
        require_compiled_in_use("ring", expect_compiled=True)


def test_no_test_file_picks_a_build_on_its_own():
    """Builds are chosen in one place (``conftest.load_twin``): a test file importing
    ``stem._speedups`` itself is how a selector that passes quietly crept in."""
    pattern = re.compile(r"import_module\(\s*f?[\"']stem\._speedups|from stem\._speedups|import stem\._speedups")
    offenders = [str(path.relative_to(TESTS)) for path in sorted(TESTS.rglob("*.py"))
                 if path.name != "conftest.py" and pattern.search(path.read_text())]
    assert not offenders, f"use the twin/compiled_twin fixtures of tests/conftest.py in {offenders}"


# ---- stubs of the compiled modules ------------------------------------------------------

STUBS = Path(_native.__file__).parent / "_speedups"


def _public(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """The public names a module or class body of a stub defines."""
    names: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, ast.Assign):
            names.update((t.id, node) for t in node.targets if isinstance(t, ast.Name))
    return {name: node for name, node in names.items() if not name.startswith("_")}


def _stub_parameters(node: ast.FunctionDef) -> list[tuple[str, str]]:
    a = node.args
    params = [(p.arg, "POSITIONAL_ONLY") for p in a.posonlyargs] + [(p.arg, "POSITIONAL_OR_KEYWORD") for p in a.args]
    params += [(a.vararg.arg, "VAR_POSITIONAL")] if a.vararg else []
    params += [(p.arg, "KEYWORD_ONLY") for p in a.kwonlyargs]
    params += [(a.kwarg.arg, "VAR_KEYWORD")] if a.kwarg else []
    return [p for p in params if p[0] not in ("self", "cls")]


def _parameters(func) -> list[tuple[str, str]]:
    return [(p.name, p.kind.name) for p in inspect.signature(func).parameters.values() if p.name != "self"]


def _is_property(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list)


@pytest.mark.parametrize("name", _native.MODULES)
def test_each_compiled_modules_stub_has_the_pure_twins_names_and_parameters(name):
    """The stub describes the compiled module; the pure twin is the reference for its API."""
    pure = _native.pure(name)
    module = ast.parse((STUBS / f"{name}.pyi").read_text())
    stub = _public(module.body)
    assert sorted(stub) == sorted(pure.__all__)
    [stub_all] = [n.value for n in module.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__"]
    assert sorted(ast.literal_eval(stub_all)) == sorted(pure.__all__)
    for attr, node in stub.items():
        ref = getattr(pure, attr)
        if isinstance(node, ast.FunctionDef):
            assert _stub_parameters(node) == _parameters(ref), f"{name}.{attr}"
        elif isinstance(node, ast.ClassDef):
            members = _public(node.body)
            assert sorted(members) == sorted(m for m in dir(ref) if not m.startswith("_")), f"{name}.{attr}"
            for member, mnode in members.items():
                if isinstance(mnode, ast.FunctionDef) and not _is_property(mnode):
                    assert _stub_parameters(mnode) == _parameters(getattr(ref, member)), f"{name}.{attr}.{member}"
            [init] = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name in ("__init__", "__new__")]
            assert _stub_parameters(init) == _parameters(ref.__init__), f"{name}.{attr}.{init.name}"


@pytest.mark.parametrize("name", _native.MODULES)
def test_both_builds_export_the_same_names(compiled_twin, name):
    compiled, pure = getattr(compiled_twin, name), _native.pure(name)
    assert sorted(compiled.__all__) == sorted(pure.__all__)
    for attr in pure.__all__:
        c, py = getattr(compiled, attr), getattr(pure, attr)
        if isinstance(py, type):
            assert {m for m in dir(c) if not m.startswith("_")} == {m for m in dir(py) if not m.startswith("_")}


def test_the_stubs_are_package_data():
    config = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "stem._speedups" in config["packages"]
    globs = config["package-data"]["stem._speedups"]
    for name in _native.MODULES:
        assert any(fnmatch.fnmatch(f"{name}.pyi", g) for g in globs), name
