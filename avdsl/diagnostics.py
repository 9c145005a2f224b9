"""Diagnostics: every user mistake becomes one `SpecError` that points at the spec.

A diagnostic names ``file:line:column``, says what is wrong, and gives a hint. The command line prints
it with the offending source line and a caret under the column (rustc/Elm style) and exits with code 2.
Nothing here knows about YAML or torch: a `Loc` is just a place in a text file.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Loc:
    """A place in a spec: 1-based line and column. ``file`` is a path or a pseudo-name like ``<--set>``."""

    file: str
    line: int = 1
    column: int = 1

    def shifted(self, columns: int) -> "Loc":
        return Loc(self.file, self.line, self.column + columns)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


UNKNOWN = Loc("<unknown>", 1, 1)


@dataclass
class Diagnostic:
    """One finding: where, what (``message``), and what to do (``hint``)."""

    loc: Loc
    message: str
    hint: str = ""
    code: str = "E"  # "E" for errors that stop a build; lint rules use their own codes
    severity: str = "error"
    notes: list[str] = field(default_factory=list)

    def headline(self) -> str:
        # a build error may carry the code of the lint rule that explains it; it prints like any build error
        code = f"{self.code} " if self.code and self.code != "E" and self.severity != "error" else ""
        return f"{self.loc}: {code}{self.message}"

    def to_json(self) -> dict:
        return {
            "file": self.loc.file,
            "line": self.loc.line,
            "column": self.loc.column,
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "hint": self.hint,
        }


class SpecError(Exception):
    """A mistake in a spec (or in how it was asked for). Carries one diagnostic; never a crash."""

    def __init__(self, loc: Loc, message: str, hint: str = "", code: str = "E") -> None:
        super().__init__(f"{loc}: {message}")
        self.diagnostic = Diagnostic(loc, message, hint, code)
        self.sources: dict[str, str] = {}  # texts that are not files on disk (standard input), for rendering

    def with_sources(self, sources: dict[str, str]) -> "SpecError":
        """Remember the texts the spec was read from, so the error can show its line."""
        self.sources = {**sources, **self.sources}
        return self

    @property
    def loc(self) -> Loc:
        return self.diagnostic.loc


def did_you_mean(word: str, choices, what: str = "") -> str:
    """A hint naming the closest choice(s), or listing what is allowed when nothing is close."""
    choices = sorted({str(c) for c in choices})
    close = difflib.get_close_matches(str(word), choices, n=2, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    if not choices:
        return ""
    shown = ", ".join(f"'{c}'" for c in choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"expected {what + ' ' if what else ''}one of {shown}"


def source_line(loc: Loc, sources: dict[str, str] | None = None) -> str | None:
    """The text of the line a location points at, from ``sources`` or the file on disk."""
    text = (sources or {}).get(loc.file)
    if text is None:
        try:
            text = Path(loc.file).read_text(encoding="utf-8", errors="replace")
        except (OSError, ValueError):
            return None
    lines = text.splitlines()
    if 1 <= loc.line <= len(lines):
        return lines[loc.line - 1]
    return None


def render(diag: Diagnostic, sources: dict[str, str] | None = None, max_width: int = 160) -> str:
    """Plain-text rendering: headline, the source line with a caret, then the hint."""
    out = [diag.headline()]
    line = source_line(diag.loc, sources)
    if line is not None:
        col = max(diag.loc.column - 1, 0)
        start = max(0, col - max_width // 2) if len(line) > max_width else 0
        shown = line[start : start + max_width]
        gutter = f"{diag.loc.line:>4} | "
        out.append(gutter + shown)
        out.append(" " * (len(gutter) + col - start) + "^")
    if diag.hint:
        out.append(f"hint: {diag.hint}")
    out.extend(f"note: {n}" for n in diag.notes)
    return "\n".join(out)
