"""Typed task handles under a type checker: mypy runs on tests/typing/.

``good.py`` must check clean: its ``assert_type`` lines pin the inferred types, so a
handle, a ``TaskRef`` or a result that became ``Any`` fails it.  Every line of
``bad_calls.py`` marked ``# E: <code>`` must get an error with that code, and no
other line any: a wrong argument name, count or type stops being an error only by
a regression.  One mypy process checks both (about 2 s, its cache in a temporary
directory).  Needs mypy, from the dev extra (``make test`` installs it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .support import ROOT

pytestmark = [pytest.mark.typecheck, pytest.mark.build_independent]   # mypy reads the source

TYPING = ROOT / "tests" / "typing"
EXPECTED = re.compile(r"#\s*E:\s*([a-z-]+)")
REPORTED = re.compile(r"^(?P<file>[^:\n]+\.py):(?P<line>\d+): error: (?P<message>.*?)\s+\[(?P<code>[a-z-]+)\]$",
                      re.MULTILINE)


@pytest.fixture(scope="module")
def mypy_report(tmp_path_factory) -> dict[tuple[str, int], list[str]]:
    pytest.importorskip("mypy", reason="the type tests need mypy: pip install -e '.[dev]'")
    work = tmp_path_factory.mktemp("mypy")
    config = work / "mypy.ini"
    # stem's own modules are read for their types but not reported on: the handles' types are under test
    config.write_text(f"[mypy]\ncache_dir = {work / 'cache'}\nmypy_path = {TYPING}\n"
                      "show_error_codes = True\nwarn_unused_ignores = True\n"
                      "[mypy-stem.*]\nfollow_imports = silent\n")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--no-error-summary",
                           "good.py", "bad_calls.py"],
                          cwd=TYPING, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MYPYPATH": str(ROOT)})
    assert proc.returncode in (0, 1), f"mypy crashed:\n{proc.stdout}\n{proc.stderr}"
    report: dict[tuple[str, int], list[str]] = {}
    for m in REPORTED.finditer(proc.stdout):
        report.setdefault((os.path.basename(m["file"]), int(m["line"])), []).append(m["code"])
    unparsed = [line for line in proc.stdout.splitlines() if ": error:" in line and not REPORTED.match(line)]
    assert not unparsed, f"mypy errors this test cannot read:\n" + "\n".join(unparsed)
    return report


def test_the_good_calls_check_clean_with_their_types_pinned(mypy_report):
    errors = {key: codes for key, codes in mypy_report.items() if key[0] == "good.py"}
    assert not errors, f"tests/typing/good.py: {errors}"
    assert "assert_type" in (TYPING / "good.py").read_text()


def test_every_wrong_call_is_an_error_of_the_expected_kind(mypy_report):
    expected = {}
    for number, line in enumerate((TYPING / "bad_calls.py").read_text().splitlines(), 1):
        m = EXPECTED.search(line)
        if m:
            expected[number] = m.group(1)
    assert len(expected) >= 15
    reported = {line: codes for (file, line), codes in mypy_report.items() if file == "bad_calls.py"}
    missing = {line: code for line, code in expected.items() if code not in reported.get(line, [])}
    unexpected = {line: codes for line, codes in reported.items() if line not in expected}
    assert not missing, f"tests/typing/bad_calls.py lines mypy no longer rejects: {missing}"
    assert not unexpected, f"tests/typing/bad_calls.py: errors on unmarked lines: {unexpected}"
