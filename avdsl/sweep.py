"""Sweeps: a spec times a grid of values, as data (pure; nothing here imports torch).

``--grid KEY=V1,V2,...`` names a spec key (any key ``--set`` accepts, ``vars`` included) and the values
it takes; the sweep is the product of its grids, times ``--seeds`` seeds. Every variant is loaded,
validated and costed here, before anything trains, so that a bad value is one located error
(``<--grid>:LINE:COLUMN``, where line N is the N-th ``--grid`` argument) and not a crash in run 7.

Variants whose models are identical up to what a member of a vectorized ensemble may hold on its own
(training settings: seed, learning rate, weight decay, warmup, clipping; in the model: loss weights
and dropout rates) form one group,
which the runtime trains together (`avdsl.runtime.train.ensemble`); the others train one by one.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, fields, is_dataclass

import yaml

from .api import Analysis, analyse_doc
from .diagnostics import Loc, SpecError, did_you_mean
from .loader import apply_override, load_file

GRID = "<--grid>"
MAX_VARIANTS = 256  # runs (variants x seeds) one sweep may ask for
MAX_SEEDS = 64
MAX_VALUES = 64  # values of one grid key


@dataclass(frozen=True)
class Axis:
    """One ``--grid`` argument: a dotted key and its values (as YAML would read them)."""

    key: str
    values: tuple
    texts: tuple[str, ...]  # each value as written
    line: int  # which --grid argument (1-based), for diagnostics
    columns: tuple[int, ...]  # where each value starts in that argument (1-based)

    @property
    def label(self) -> str:
        """The key as shown in tables and plots: ``vars.fusion_layer`` -> ``fusion_layer``."""
        return self.key.removeprefix("vars.")


@dataclass
class Variant:
    """One run of the sweep: an assignment of grid values, a seed, and what the analysis found."""

    assignment: tuple  # ((key, value text), ...) in grid order
    seed: int
    analysis: Analysis
    train: dict  # the spec's `train:` mapping after overrides
    group: str = ""  # runs with the same group key can train as one vectorized ensemble

    @property
    def name(self) -> str:
        """The variant's run directory name: readable, unique, safe as a path component."""
        return run_name(self.assignment, self.seed)

    @property
    def point(self) -> str:
        """The grid point without the seed (what seeds are averaged over)."""
        return ", ".join(f"{k}={v}" for k, v in self.assignment) or "(spec)"

    @property
    def params(self) -> int:
        return self.analysis.cost.total_params

    @property
    def flops(self) -> int:
        return self.analysis.cost.total_flops


@dataclass
class Plan:
    spec: str
    axes: list[Axis]
    variants: list[Variant] = field(default_factory=list)

    def points(self) -> list[str]:
        return list(dict.fromkeys(v.point for v in self.variants))


# ---------------------------------------------------------------------------------------- grids


def _split_values(text: str) -> list[tuple[str, int]]:
    """Split ``a,b,[1, 2],'x,y',0.1 * nce(a, b)`` at the commas outside brackets, parentheses and
    quotes; (value, offset) pairs."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append((text[start:i], start))
            start = i + 1
    parts.append((text[start:], start))
    return parts


_EXPONENT = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+\s*$")


def _value(text: str):
    """A value as YAML reads it, except that ``1e-3`` is a number (YAML 1.1 wants ``1.0e-3``)."""
    return float(text) if _EXPONENT.match(text) else yaml.safe_load(text)


def parse_grid(items: list[str]) -> list[Axis]:
    """``KEY=V1,V2,...`` arguments -> axes. Raises a `SpecError` located in the argument."""
    axes: list[Axis] = []
    for line, item in enumerate(items, 1):
        def where(column: int) -> Loc:
            return Loc(GRID, line, column)

        if "=" not in item:
            raise SpecError(where(1), f"`--grid {item}` has no '='", "write `--grid vars.fusion_layer=0,4,8`")
        key, _, raw = item.partition("=")
        if not key.strip() or any(not p.strip() for p in key.split(".")) or key != key.strip():
            raise SpecError(where(1), f"`--grid {item}`: '{key}' is not a dotted key path", "e.g. `--grid train.lr=1e-3,3e-3`")
        if key in ("seed", "train.seed"):
            raise SpecError(where(1), "seeds are not a grid key", "use `--seeds N` (runs seeds 0 .. N-1 of every variant)")
        if any(a.key == key for a in axes):
            first = next(a for a in axes if a.key == key)
            raise SpecError(where(1), f"'{key}' is already swept by --grid number {first.line}", "give each key one --grid with all its values")
        base = len(key) + 2
        values, texts, columns = [], [], []
        for text, offset in _split_values(raw):
            column = base + offset + (len(text) - len(text.lstrip()))
            if not text.strip():
                raise SpecError(where(base + offset), f"`--grid {key}`: empty value", "separate values by single commas: `KEY=1,2,3`")
            try:
                value = _value(text)
            except yaml.YAMLError:
                raise SpecError(where(column), f"`--grid {key}`: '{text.strip()}' is not a value", "quote text values: `KEY='a,b'`") from None
            if text.strip() in texts:
                raise SpecError(where(column), f"`--grid {key}`: '{text.strip()}' is listed twice", "list each value once")
            values.append(value)
            texts.append(text.strip())
            columns.append(column)
        if len(values) > MAX_VALUES:
            raise SpecError(where(base), f"`--grid {key}` has {len(values)} values, more than {MAX_VALUES}", "sweep fewer values")
        axes.append(Axis(key, tuple(values), tuple(texts), line, tuple(columns)))
    return axes


def run_name(assignment: tuple, seed: int) -> str:
    """``fusion_layer=4-seed=0``; characters a path should not hold become ``_``, and a short hash
    keeps names unique when that (or shortening) changed them."""
    exact = "-".join([f"{k.removeprefix('vars.')}={v}" for k, v in assignment] + [f"seed={seed}"])
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", exact)[:100]
    if safe != exact:
        safe += "-" + hashlib.sha256(exact.encode()).hexdigest()[:8]
    return safe


# --------------------------------------------------------------------------------------- variants


def _in_variant(error: SpecError, assignment: tuple) -> SpecError:
    """The same error, with a note naming the sweep variant it came from."""
    point = ", ".join(f"{k}={v}" for k, v in assignment)
    if point:
        error.diagnostic.notes.append(f"in the sweep variant {point}")
    return error


def _apply_axis(doc, axis: Axis, text: str) -> None:
    """``--set KEY=VALUE`` for one grid value, with the value's position moved into the grid, so
    that whatever a later pass says about it points at the value in the --grid argument."""
    index = axis.texts.index(text)
    column = axis.columns[index]
    try:
        apply_override(doc, f"{axis.key}={json.dumps(axis.values[index])}")  # JSON is YAML: the value as parsed
    except SpecError as e:
        raise SpecError(Loc(GRID, axis.line, 1), e.diagnostic.message.replace("`--set ", "`--grid "), e.diagnostic.hint) from None
    for path, loc in list(doc.locs.items()):
        if loc.file == "<--set>" and ".".join(map(str, path)) == axis.key:
            doc.locs[path] = Loc(GRID, axis.line, column)


def _check_key(doc, axis: Axis) -> None:
    """A swept var must exist: a new var changes nothing, so it is surely a typo."""
    parts = axis.key.split(".")
    if parts[0] == "vars" and len(parts) == 2 and parts[1] not in (doc.data.get("vars") or {}):
        names = list(doc.data.get("vars") or {})
        hint = did_you_mean(parts[1], names, "a var") if names else "this spec declares no vars"
        raise SpecError(Loc(GRID, axis.line, 1), f"the spec has no var '{parts[1]}'", hint)


def plan_sweep(spec: str, axes: list[Axis], seeds: int, overrides: list[str] = ()) -> Plan:
    """Load, validate and cost every variant (raises the first variant's `SpecError`)."""
    if not 1 <= seeds <= MAX_SEEDS:
        raise ValueError(f"seeds must be 1 to {MAX_SEEDS}, got {seeds}")  # the command checks its option first
    runs = seeds
    for axis in axes:
        runs *= len(axis.values)
    if runs > MAX_VARIANTS:
        raise SpecError(Loc(GRID, 1, 1), f"the sweep asks for {runs} runs, more than {MAX_VARIANTS}",
                        "sweep fewer values or seeds, or split the sweep")
    base = load_file(spec, list(overrides))  # read once (it may be standard input); shared --set values first
    for axis in axes:
        _check_key(base, axis)
    plan = Plan(spec, axes)
    for combo in itertools.product(*(axis.texts for axis in axes)):
        assignment = tuple(zip((a.key for a in axes), combo))
        try:
            doc = copy.deepcopy(base)
            for axis, text in zip(axes, combo):
                _apply_axis(doc, axis, text)
            analysis = analyse_doc(doc)
        except SpecError as e:
            raise _in_variant(e, assignment) from None
        first_seed = int(analysis.spec.train.get("seed", 0))
        for i in range(seeds):
            train = dict(analysis.spec.train, seed=first_seed + i)
            plan.variants.append(Variant(assignment, first_seed + i, analysis, train))
    return plan


# fields of the IR that say where something was written, not what it computes
_PLACES = frozenset(("loc", "locs", "col"))
# values an ensemble member holds on its own (the model's `loss_weights` buffer and its dropout rates)
MEMBER_FIELDS = frozenset((("LossNode", "weights"), ("EncoderDecl", "dropout")))


def _plain(value, leave_out: frozenset):
    """``value`` as JSON-able data, without source places and without the fields in ``leave_out``."""
    if is_dataclass(value) and not isinstance(value, type):
        kind = type(value).__name__
        return {"": kind, **{f.name: _plain(getattr(value, f.name), leave_out) for f in fields(value)
                             if f.name not in _PLACES and (kind, f.name) not in leave_out}}
    if isinstance(value, dict):
        return {str(k): _plain(v, leave_out) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, leave_out) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def model_key(graph, leave_out: frozenset = MEMBER_FIELDS) -> str:
    """A fingerprint of what ``graph`` computes, leaving out where it was written and the fields in
    ``leave_out``: two variants with the same key build modules of the same kinds and shapes and run
    the same generated code."""
    nodes = [_plain(node, leave_out) for node in graph.nodes()]
    text = json.dumps([nodes, _plain(graph.tensors, leave_out), _plain(graph.outputs, leave_out)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def group_key(graph, settings: dict, member_settings: tuple[str, ...]) -> str:
    """Runs share a group when they build the same model up to what ensemble members hold apart
    (`model_key`) and their settings agree except ``member_settings`` (those of each member's optimizer)."""
    shared = {k: v for k, v in sorted(settings.items()) if k not in member_settings}
    text = json.dumps([model_key(graph), shared], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def diagnostic_sources(items: list[str]) -> dict:
    """The `<--grid>` pseudo-file for rendering diagnostics: one --grid argument per line."""
    return {GRID: "\n".join(items)}


__all__ = ["Axis", "GRID", "MEMBER_FIELDS", "Plan", "Variant", "diagnostic_sources", "group_key", "model_key",
           "parse_grid", "plan_sweep", "run_name"]
