"""The bad-spec corpus: every hand-written mistake gives exit code 2 and ONE diagnostic, fast.

Each file in ``tests/bad_specs/`` is one mistake. Its first line says what must come out::

    # expect: [FILE:]LINE:COL message fragment [| hint fragment]
    # args: --set key=value          (optional second line: extra command-line arguments)

FILE is given only when the error lies in another file (an ``extends`` base, or ``<--set>``).
Files under ``bad_specs/_parts/`` are bases that the ``extends`` cases load. The two files that cannot
carry a comment (an empty and a whitespace-only spec) have their expectation in ``NO_HEADER`` below.
Cases too big to keep in the repository (a 1 MB line, an oversized file) are generated here.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from avdsl import cli

CORPUS = Path(__file__).parent / "bad_specs"
TIME_LIMIT_S = 1.0
NO_HEADER = {"empty.yaml": "1:1 the spec is empty", "whitespace_only.yaml": "1:1 the spec is empty"}
EXPECT = re.compile(r"^(?:(?P<file>\S+?):)?(?P<line>\d+):(?P<col>\d+) (?P<message>.+?)(?: \| (?P<hint>.+))?$")
HEADLINE = re.compile(r"^error: (?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?:[A-Z]\d{3} )?(?P<message>.+)$")


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    file: str
    line: int
    col: int
    message: str
    hint: str | None


def load_case(path: Path) -> Case:
    """Read a case's expectation from its first line (or from NO_HEADER)."""
    head = path.read_bytes().split(b"\n", 2)
    lines = [h.decode("ascii", errors="replace") for h in head[:2]]
    if path.name in NO_HEADER:
        expect, args = NO_HEADER[path.name], ()
    else:
        assert lines[0].startswith("# expect: "), f"{path.name} has no `# expect:` first line"
        expect = lines[0][len("# expect: "):].rstrip()
        args = tuple(lines[1][len("# args: "):].split(" ", 1)) if len(lines) > 1 and lines[1].startswith("# args: ") else ()
    m = EXPECT.match(expect)
    assert m, f"{path.name}: cannot read the expectation {expect!r}"
    return Case(path.name, args, m["file"] or path.name, int(m["line"]), int(m["col"]), m["message"], m["hint"])


CASES = [load_case(p) for p in sorted(CORPUS.glob("*.yaml"))]


def check_one_diagnostic(code: int, out: str, err: str) -> re.Match:
    """Exit 2, exactly one `error:` headline FILE:LINE:COL: message, a hint, no traceback."""
    assert code == cli.EXIT_BAD_SPEC, (code, out, err)
    text = out + err
    assert "Traceback" not in text
    headlines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(headlines) == 1, err
    m = HEADLINE.match(headlines[0])
    assert m, headlines[0]
    hints = [line for line in err.splitlines() if line.startswith("hint: ")]
    assert len(hints) == 1 and len(hints[0]) > len("hint: "), err
    return m


@pytest.fixture(scope="module", autouse=True)
def warm():
    """Import every command and the grammar once, so the per-case timings measure the checks only."""
    cli.main(["build", str(CORPUS.parent.parent / "specs" / "tiny" / "zorro.yaml"), "--json"])


@pytest.fixture
def in_corpus(monkeypatch):
    monkeypatch.chdir(CORPUS)


def test_corpus_is_large_and_varied():
    assert len(CASES) >= 50
    prefixes = {c.name.split("_")[0] for c in CASES}
    for kind in ("yaml", "extends", "set", "grammar", "unknown", "op", "cycle", "version", "routing"):
        assert kind in prefixes, kind


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_spec(case: Case, in_corpus, capsys):
    t0 = time.perf_counter()
    code = cli.main(["build", case.name, *case.args])
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    m = check_one_diagnostic(code, captured.out, captured.err)
    assert (m["file"], int(m["line"]), int(m["col"])) == (case.file, case.line, case.col), captured.err
    assert case.message in m["message"], captured.err
    if case.hint:
        assert case.hint in captured.err.split("\nhint: ", 1)[1], captured.err
    assert seconds < TIME_LIMIT_S, f"{case.name} took {seconds:.2f} s"


def test_location_points_at_the_source_line(in_corpus, capsys):
    """The caret line sits under the reported column of the quoted source line."""
    cli.main(["build", "unknown_stream_key.yaml"])
    err = capsys.readouterr().err.splitlines()
    source, caret = err[1], err[2]
    assert source.endswith("tokeniser: tubelet(2, 8, 8)")
    assert caret.index("^") == source.index("tokeniser")


# ------------------------------------------------------------------------- generated big cases


def run_generated(tmp_path, capsys, text: str | bytes, name: str = "spec.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    t0 = time.perf_counter()
    code = cli.main(["build", str(path)])
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    return check_one_diagnostic(code, captured.out, captured.err), seconds, captured.err


def test_one_megabyte_expression_line(tmp_path, capsys):
    text = "avdsl: 1\noutputs:\n  za: " + "mean(" * 5 + "x" * 1_000_000 + ")\n"
    m, seconds, err = run_generated(tmp_path, capsys, text)
    assert "longer than 2000 characters" in m["message"] or "missing the required key" in m["message"]
    assert seconds < TIME_LIMIT_S
    assert max(len(line) for line in err.splitlines()) < 400  # the 1 MB line is shown clipped


def test_one_megabyte_unknown_key(tmp_path, capsys):
    key = "k" * 1_000_000
    m, seconds, err = run_generated(tmp_path, capsys, f"avdsl: 1\n{key}: 3\n")
    assert int(m["line"]) == 2
    assert seconds < TIME_LIMIT_S


def test_oversized_file(tmp_path, capsys):
    text = "avdsl: 1\ndoc: |\n" + ("  " + "x" * 99 + "\n") * 30_000  # 3 MB
    m, seconds, _ = run_generated(tmp_path, capsys, text)
    assert "larger than" in m["message"]
    assert seconds < TIME_LIMIT_S


def test_missing_file_and_directory(tmp_path, capsys):
    code = cli.main(["build", str(tmp_path / "nope.yaml")])
    m = check_one_diagnostic(code, *capsys.readouterr())
    assert "no spec file or built-in spec" in m["message"]
    code = cli.main(["build", str(tmp_path)])
    check_one_diagnostic(code, *capsys.readouterr())


def test_file_name_too_long(capsys):
    code = cli.main(["build", "z" * 5000])
    check_one_diagnostic(code, *capsys.readouterr())


def test_command_line_mistakes_exit_2_without_traceback(capsys):
    for argv in (["build"], ["build", "tiny/zorro", "--no-such-option"], ["no-such-command"]):
        code = cli.main(argv)
        captured = capsys.readouterr()
        assert code == cli.EXIT_BAD_SPEC, argv
        assert "Traceback" not in captured.out + captured.err


# ------------------------------------------------------------------------------ real processes

SUBPROCESS_CASES = ["python_tag.yaml", "deep_nesting.yaml", "non_utf8.yaml", "set_no_equals.yaml"]


def _command() -> list[str]:
    return [sys.executable, "-m", "avdsl"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_subprocess_gives_one_diagnostic(name):
    case = next(c for c in CASES if c.name == name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COLUMNS")}
    proc = subprocess.run([*_command(), "build", name, *case.args], cwd=CORPUS, capture_output=True, text=True,
                          timeout=60, env=env)
    m = check_one_diagnostic(proc.returncode, proc.stdout, proc.stderr)
    assert (m["file"], int(m["line"]), int(m["col"])) == (case.file, case.line, case.col), proc.stderr


@pytest.mark.skipif(shutil.which("avdsl") is None, reason="the console script is not installed")
def test_console_script_gives_one_diagnostic():
    proc = subprocess.run(["avdsl", "build", "unknown_top_key.yaml"], cwd=CORPUS, capture_output=True, text=True,
                          timeout=60)
    m = check_one_diagnostic(proc.returncode, proc.stdout, proc.stderr)
    assert "unknown key 'loses'" in m["message"]
