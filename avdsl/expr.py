"""The expression language: lark grammar (``grammar/avdsl.lark``) -> small typed AST.

Every node keeps ``col``, its 0-based column inside the expression string, so a problem found later
(an unknown name, a shape mismatch) is reported at the exact YAML line and column.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import lark

from .diagnostics import Loc, SpecError
from .limits import MAX_EXPR_CHARS, MAX_EXPR_DEPTH, MAX_NUMBER_DIGITS


# ------------------------------------------------------------------------------------------ AST


@dataclass(frozen=True)
class Num:
    value: float | int
    col: int = 0


@dataclass(frozen=True)
class Str:
    value: str
    col: int = 0


@dataclass(frozen=True)
class Ref:
    """A dotted name: ``backbone.audio``, ``audio.mask``, ``label``."""

    parts: tuple[str, ...]
    col: int = 0

    @property
    def name(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class ListExpr:
    items: tuple
    col: int = 0


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple = ()
    kwargs: tuple[tuple[str, object], ...] = ()  # (name, expr) pairs, in order
    col: int = 0

    def kwarg(self, name: str, default=None):
        for key, value in self.kwargs:
            if key == name:
                return value
        return default


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * /
    left: object
    right: object
    col: int = 0


@dataclass(frozen=True)
class Neg:
    operand: object
    col: int = 0


Expr = Num | Str | Ref | ListExpr | Call | BinOp | Neg


@dataclass(frozen=True)
class Decl:
    """``frames[B, 3, 8, 224, 224] : video`` — an input tensor with its kind."""

    name: str
    dims: tuple  # ints and symbol names
    kind: Call | None
    col: int = 0
    dim_cols: tuple = ()


@dataclass(frozen=True)
class Range:
    """A half-open layer range ``start..stop:step``; bounds are ints, var names, or None (open)."""

    start: int | str | None = None
    stop: int | str | None = None
    step: int = 1
    col: int = 0
    single: bool = False  # `@ 3` or `@ fusion_layer`: exactly that one layer


@dataclass(frozen=True)
class Rule:
    """``queries <- keys [via W] [(flags)] [@ range]``."""

    queries: tuple[str, ...]
    keys: tuple[str, ...]
    via: str | None = None
    flags: tuple[str, ...] = ()
    range: Range | None = None
    col: int = 0
    name_cols: dict = field(default_factory=dict, compare=False, hash=False)  # name -> first column


@dataclass(frozen=True)
class Use:
    """``use NAME [@ range]``: the rules of a named rule set (or of the rule set a var names)."""

    name: str
    range: Range | None = None
    col: int = 0


# --------------------------------------------------------------------------------------- parser


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    text = resources.files("avdsl.grammar").joinpath("avdsl.lark").read_text()
    return lark.Lark(text, start=["decl", "rule", "expr"], parser="lalr", propagate_positions=True,
                     maybe_placeholders=True)


def _col(item) -> int:
    if isinstance(item, lark.Token):
        return (item.column or 1) - 1
    meta = getattr(item, "meta", None)
    return (meta.column - 1) if meta is not None and not meta.empty else 0


class _NumberError(Exception):
    """A number that cannot be a size or weight (too many digits, not finite); ``col`` is where."""

    def __init__(self, col: int, message: str):
        super().__init__(message)
        self.col = col


class _ToAst(lark.Transformer):
    """lark tree -> AST dataclasses."""

    def number(self, items):
        tok = items[0]
        text = str(tok)
        digits = len(text.split("e")[0].split("E")[0].replace(".", "").lstrip("0"))
        if digits > MAX_NUMBER_DIGITS:
            raise _NumberError(_col(tok), f"the number {text[:20]}... has {digits} digits")
        value = int(text) if text.isdigit() else float(text)
        if not math.isfinite(float(value)) or (value != 0 and abs(value) < 1e-300):
            raise _NumberError(_col(tok), f"the number {text} is out of range")
        return Num(value, _col(tok))

    def string(self, items):
        return Str(str(items[0])[1:-1], _col(items[0]))

    def ref(self, items):
        return Ref(tuple(str(t) for t in items), _col(items[0]))

    def list(self, items):
        items = tuple(i for i in items if i is not None)
        return ListExpr(items, _node_col(items[0]) - 1 if items else 0)

    def call(self, items):
        name, args = items[0], items[1]
        positional, keywords = [], []
        for arg in (args or []):
            if isinstance(arg, tuple):
                keywords.append(arg)
            else:
                positional.append(arg)
        return Call(str(name), tuple(positional), tuple(keywords), _col(name))

    def args(self, items):
        return list(items)

    def kwarg(self, items):
        return (str(items[0]), items[1])

    def _bin(op):  # noqa: N805 - small factory for the four operators
        def make(self, items):
            return BinOp(op, items[0], items[1], _node_col(items[0]))
        return make

    add, sub, mul, div = _bin("+"), _bin("-"), _bin("*"), _bin("/")

    def neg(self, items):
        return Neg(items[0], _node_col(items[0]) - 1)

    # declarations
    def dim_int(self, items):
        return (_int(items[0]), _col(items[0]))

    def dim_name(self, items):
        return (str(items[0]), _col(items[0]))

    def kind(self, items):
        name, args = items[0], items[1] if len(items) > 1 else None
        return self.call([name, args])

    def decl(self, items):
        name, rest = items[0], items[1:]
        kind = rest[-1] if rest and isinstance(rest[-1], Call) else None
        dims = [d for d in rest if isinstance(d, tuple)]
        return Decl(str(name), tuple(d[0] for d in dims), kind, _col(name), tuple(d[1] for d in dims))

    # routing
    def names(self, items):
        return [(str(t), _col(t)) for t in items]

    def via(self, items):
        return ("via", str(items[0]), _col(items[0]))

    def flags(self, items):
        return ("flags", tuple(str(t) for t in items))

    def at(self, items):
        return ("at", items[0])

    def bound_int(self, items):
        return _int(items[0])

    def bound_name(self, items):
        return str(items[0])

    @lark.v_args(meta=True)
    def range(self, meta, items):
        start, stop, step = items
        return Range(start, stop, _int(step) if step is not None else 1, meta.column - 1 if not meta.empty else 0)

    @lark.v_args(meta=True)
    def single_layer(self, meta, items):
        (bound,) = items
        return Range(bound, bound, 1, meta.column - 1 if not meta.empty else 0, single=True)

    def rule(self, items):
        queries, keys, *opts = items
        via = flags = rng = None
        for opt in opts:
            if opt is None:
                continue
            if opt[0] == "via":
                via = opt[1]
            elif opt[0] == "flags":
                flags = opt[1]
            elif opt[0] == "at":
                rng = opt[1]
        cols = {}
        for name, col in queries + keys:
            cols.setdefault(name, col)
        return Rule(tuple(n for n, _ in queries), tuple(n for n, _ in keys), via, tuple(flags or ()), rng,
                    queries[0][1], cols)

    def use(self, items):
        name, at = items
        return Use(str(name), at[1] if at else None, _col(name))


def _int(tok) -> int:
    """A whole number token, refused when it has more digits than any size could need."""
    if len(str(tok).lstrip("0")) > MAX_NUMBER_DIGITS:
        raise _NumberError(_col(tok), f"the number {str(tok)[:20]}... has {len(str(tok))} digits")
    return int(tok)


def _node_col(node) -> int:
    return getattr(node, "col", 0)


_EXPECTED_WORDS = {
    "NAME": "a name", "INT": "a whole number", "NUMBER": "a number", "STRING": "a quoted string",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "COLON": "':'",
    "EQUAL": "'='", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "DOT": "'.'",
    "__ANON_0": "'<-'", "AT": "'@'", "$END": "the end",
}

_WHAT = {
    "decl": ("an input declaration", "e.g. `frames[B, 3, 8, 224, 224] : video`"),
    "rule": ("a routing rule", "e.g. `fusion <- audio, video, fusion @ 0..12` or `use fusion_rules @ 8..`"),
    "expr": ("an expression", "e.g. `tubelet(2, 16, 16)` or `nce(za, zv, tau=0.08) + 0.5 * ce(logits, label)`"),
}


def _nesting_beyond(text: str, limit: int) -> int | None:
    """The column of the first bracket nested deeper than ``limit``, or None: checked before parsing, so
    the answer does not depend on how much of Python's stack is in use."""
    depth = 0
    for col, char in enumerate(text):
        if char in "([":
            depth += 1
            if depth > limit:
                return col
        elif char in ")]":
            depth -= 1
    return None


def parse(text: str, start: str, loc: Loc):
    """Parse ``text`` with start rule ``decl``, ``rule`` or ``expr``; errors point into the YAML."""
    what, example = _WHAT[start]
    if not isinstance(text, str):
        raise SpecError(loc, f"expected {what} written as a string, got {type(text).__name__} `{text}`", example)
    if len(text) > MAX_EXPR_CHARS:
        raise SpecError(loc, f"{what} longer than {MAX_EXPR_CHARS} characters", "split it up; expressions are short")
    too_deep = _nesting_beyond(text, MAX_EXPR_DEPTH)
    if too_deep is not None:
        raise SpecError(loc.shifted(too_deep), f"{what} nests too deeply (more than {MAX_EXPR_DEPTH} brackets)",
                        "simplify the expression")
    try:
        tree = _parser().parse(text, start=start)
        return _ToAst().transform(tree)
    except lark.exceptions.UnexpectedCharacters as err:
        col = err.column - 1
        _check_range(text, start, col, loc)
        raise SpecError(loc.shifted(col), f"unexpected character {text[col]!r} in {what}",
                        _expect_hint(err.allowed, example)) from None
    except lark.exceptions.UnexpectedToken as err:
        col = (err.column - 1) if isinstance(err.column, int) and err.column > 0 else len(text)
        if err.token.type == "$END":
            raise SpecError(loc.shifted(len(text)), f"{what} ends too early",
                            _expect_hint(err.expected, example)) from None
        _check_range(text, start, col, loc)
        raise SpecError(loc.shifted(col), f"unexpected '{err.token}' in {what}",
                        _expect_hint(err.expected, example)) from None
    except lark.exceptions.UnexpectedEOF as err:
        raise SpecError(loc.shifted(len(text)), f"{what} ends too early",
                        _expect_hint(err.expected, example)) from None
    except lark.exceptions.VisitError as err:
        if isinstance(err.orig_exc, _NumberError):
            raise SpecError(loc.shifted(err.orig_exc.col), f"{err.orig_exc} in {what}",
                            "numbers in a spec are sizes, rates and weights of ordinary size") from None
        raise SpecError(loc, f"{what}: {err.orig_exc}", example) from None
    except RecursionError:
        raise SpecError(loc, f"{what} nests too deeply", "simplify the expression") from None


_RANGE_TYPO = re.compile(r"\s*(-?[A-Za-z0-9_]+)\s*(?:-|\.{3,}|\.|:|to|\s)\s*(-?[A-Za-z0-9_]+)\s*", re.ASCII)


def _check_range(text: str, start: str, col: int, loc: Loc) -> None:
    """A syntax error inside a rule's layer range (after ``@``) that looks like a range written with
    another separator is explained as one: `@ 4-12` means `@ 4..12`."""
    at = text.rfind("@", 0, col + 1)
    if start != "rule" or at < 0:
        return
    tail = text[at + 1:]
    m = _RANGE_TYPO.fullmatch(tail)
    if m:
        raise SpecError(loc.shifted(col), f"a layer range is written with `..`, got `@{tail}`",
                        f"write `@ {m.group(1)}..{m.group(2)}` (layers {m.group(1)} up to, not including, {m.group(2)})")


def _expect_hint(expected, example: str) -> str:
    words = sorted({_EXPECTED_WORDS.get(e, e.lower().strip("_")) for e in (expected or ())})
    words = [w for w in words if not w.startswith("anon")]
    shown = ", ".join(words[:6])
    return (f"expected {shown}; " if shown else "") + example

