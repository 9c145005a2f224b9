"""Running lint: which spec files a command line names, and the findings for each.

A spec that cannot be analysed gives either a finding (when the build refused it with the code of a
lint rule, e.g. H301) or an error (any other `SpecError`: the spec could not be read; exit code 2).
A finding is suppressed by ``# noqa: CODE`` (or a bare ``# noqa``) on the line it points at.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..api import analyse
from ..diagnostics import Diagnostic, SpecError, source_line
from ..loader import resolve_spec_path
from .flow import analyse_flow
from .rules import BY_CODE, Context, run_checks

_NOQA = re.compile(r"#\s*noqa\b(?::\s*(?P<codes>[A-Z]\d{3}(?:\s*,\s*[A-Z]\d{3})*))?")


@dataclass
class LintResult:
    """The outcome for one spec: findings, or the error that stopped it being read."""

    target: str
    findings: list[Diagnostic] = field(default_factory=list)
    error: SpecError | None = None
    sources: dict = field(default_factory=dict)


def spec_targets(paths: list[str]) -> list[str]:
    """Expand the command line: directories become their ``*.yaml`` files (recursively, sorted);
    files and built-in names stay as given."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(str(f) for f in sorted(path.rglob("*.yaml")) + sorted(path.rglob("*.yml")))
        else:
            out.append(p)
    return out


def suppressed(diag: Diagnostic, sources: dict) -> bool:
    line = source_line(diag.loc, sources)
    if line is None:
        return False
    m = _NOQA.search(line)
    if m is None:
        return False
    codes = m.group("codes")
    return codes is None or diag.code in {c.strip() for c in codes.split(",")}


def lint_one(target: str, overrides: list[str] = ()) -> LintResult:
    """Analyse one spec and run every rule on it."""
    result = LintResult(target)
    try:
        analysis = analyse(target, list(overrides))
    except SpecError as e:
        if e.diagnostic.code in BY_CODE:
            rule = BY_CODE[e.diagnostic.code]
            e.diagnostic.severity = rule.severity
            result.findings = [e.diagnostic]
        else:
            result.error = e
        return result
    result.sources = analysis.doc.sources
    ctx = Context(analysis, analyse_flow(analysis.graph))
    result.findings = [d for d in run_checks(ctx) if not suppressed(d, result.sources)]
    return result


def exists(target: str) -> bool:
    return resolve_spec_path(target) is not None
