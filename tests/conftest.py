"""Shared test helpers."""
from __future__ import annotations

import textwrap

import pytest

from avdsl import cli


@pytest.fixture
def run_cli(capsys):
    """Run the avdsl command line in-process; returns (exit code, stdout, stderr)."""

    def run(*argv: str):
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec file (dedented) and return its path as a string."""

    def write(text: str, name: str = "spec.yaml") -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return str(path)

    return write
