"""Diagnostics: every user mistake becomes one `SpecError` that points at the spec.

A diagnostic names ``file:line:column``, says what is wrong, and gives a hint. The command line prints
it with the offending source line and a caret under the column (rustc/Elm style) and exits with code 2.
Nothing here knows about YAML or torch: a `Loc` is just a place in a text file.
"""
from __future__ import annotations

import difflib
import os
import stat
from dataclasses import dataclass, field

from .limits import MAX_SHOWN_LINE_CHARS, MAX_SPEC_BYTES


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
    """The text of the line a location points at, from ``sources`` or the file on disk. From disk,
    only a regular file is read, and only up to that line (a few kB of it at most), so that quoting
    a line of a huge or endless file costs no more than the line."""
    text = (sources or {}).get(loc.file)
    if text is None:
        return _line_from_file(loc)
    if loc.line < 1:
        return None
    start = 0
    for _ in range(loc.line - 1):
        start = text.find("\n", start) + 1
        if start == 0:
            return None
    end = text.find("\n", start, start + MAX_SHOWN_LINE_CHARS)
    line = text[start: end if end >= 0 else start + MAX_SHOWN_LINE_CHARS]
    if not line and start >= len(text):
        return None
    return line.rstrip("\r")


def _line_from_file(loc: Loc) -> str | None:
    """Line ``loc.line`` of a regular file, reading no more than a spec's size limit to find it."""
    try:
        if loc.line < 1 or not stat.S_ISREG(os.stat(loc.file).st_mode):
            return None
        with open(loc.file, "rb") as handle:
            budget, number, raw = MAX_SPEC_BYTES, 0, b""
            while number < loc.line and budget > 0:
                raw = handle.readline(min(budget, 1 << 16))
                if not raw:
                    return None
                budget -= len(raw)
                if raw.endswith(b"\n") or number + 1 == loc.line:
                    number += 1
            if number < loc.line:
                return None
        return raw[:MAX_SHOWN_LINE_CHARS].decode("utf-8", errors="replace").rstrip("\r\n")
    except (OSError, ValueError):
        return None


def printable(text: str) -> str:
    """``text`` with line breaks, escape sequences and other control characters written as escapes
    (``\\n``, ``\\x1b``), so that user text in a message cannot break lines or drive the terminal."""
    if all(ch.isprintable() or ch == "\t" for ch in text):
        return text
    return "".join(ch if ch.isprintable() or ch == "\t" else repr(ch)[1:-1] for ch in text)


def render(diag: Diagnostic, sources: dict[str, str] | None = None, max_width: int = 160) -> str:
    """Plain-text rendering: headline, the source line with a caret, then the hint. User text in any
    part is made printable first (see `printable`)."""
    out = [printable(diag.headline())]
    line = source_line(diag.loc, sources)
    if line is not None:
        line = printable(line.replace("\t", " ")) if not line.isprintable() else line
    if line is not None:
        col = max(diag.loc.column - 1, 0)
        start = max(0, col - max_width // 2) if len(line) > max_width else 0
        shown = line[start : start + max_width]
        gutter = f"{diag.loc.line:>4} | "
        out.append(gutter + shown)
        out.append(" " * (len(gutter) + col - start) + "^")
    if diag.hint:
        out.append(f"hint: {printable(diag.hint)}")
    out.extend(f"note: {printable(n)}" for n in diag.notes)
    return "\n".join(out)
