"""Reference checkpoints into avdsl weights: a format is a data file, this module applies it.

A *format* (``runtime/formats/NAME.yaml``, shipped with the package) says how the tensors of a
reference implementation's checkpoint become the tensors of an avdsl model. Adding a format is adding
such a file; nothing here knows any model. (torch is imported only by the functions that need it, so
that the command line can list the formats without loading it.) The keys of a format file:

``format``
    its name (the file's name without ``.yaml``), used as ``avdsl import SPEC CHECKPOINT --from NAME``.
``doc``
    one paragraph: which repository and class, which spec the names are those of.
``spec``
    the built-in spec (or the kind of spec) whose tensor names the rows use; shown in hints.
``file``
    how the checkpoint file is read: ``torch`` (a PyTorch state dict, ``.pth``/``.pt``, read with
    ``torch.load(weights_only=True)``: tensors and plain containers only, never code) or ``npz`` (a
    NumPy ``.npz`` of named arrays, read with ``allow_pickle=False``; a flax parameter tree is
    flattened into it with ``/``-joined names).
``nested_in`` (optional)
    keys under which the state dict may sit (``[state_dict, model]``: the first present one whose
    value is a mapping is taken; a file without them is the state dict itself).
``strip_prefix`` (optional)
    prefixes removed from every checkpoint name that has them (``module.`` from ``DataParallel``).
``transforms`` (optional)
    named lists of *steps* applied to a checkpoint tensor, in order, to give the avdsl tensor:

    - ``{permute: [a, b, ...]}``: reorder the axes (``tensor.permute``): a flax ``[in, out]`` kernel
      is ``permute: [1, 0]``, a flax ``[h, w, in, out]`` convolution ``permute: [3, 2, 0, 1]``;
    - ``{flatten: [first, last]}``: merge axes first..last into one (``tensor.flatten``): flax's
      ``[width, heads, head_dim]`` projection kernels are ``flatten: [1, 2]`` then ``permute: [1, 0]``;
    - ``{reshape: [d0, d1, ...]}``: the same values in another shape (``tensor.reshape``, one size may
      be -1): a ``[tokens, width]`` table as avdsl's ``[1, tokens, width]`` is ``reshape: [1, -1, WIDTH]``;
    - ``{regrid: [axis, rows]}``: axis ``axis`` holds a ``rows x cols`` grid in row-major order
      (``cols`` follows from the axis' length); it is re-ordered column-major, i.e. the grid is
      transposed. Token and value orders that differ by the two axes of a patch grid are this.
    - ``{unsqueeze: [axis]}``: a new axis of length 1 at ``axis`` (``tensor.unsqueeze``): a
      ``[tokens, width]`` table of any width as avdsl's ``[1, tokens, width]`` is ``unsqueeze: [0]``;
    - ``{parts: [axis, n, k0, k1, ...]}``: axis ``axis`` cut into ``n`` equal parts, of which parts
      ``k0, k1, ...`` are kept, in that order: the two halves of a gated feed-forward's first
      projection in the other order are ``parts: [0, 2, 1, 0]``; the query rows of a packed
      ``[3 x width, width]`` in-projection ``parts: [0, 3, 0]``, its key and value rows
      ``parts: [0, 3, 1, 2]``. Only a transform that begins with ``parts`` lets several rows share one
      checkpoint tensor, each taking other parts of it (together all of them).

    A row with several source tensors applies its steps to each and concatenates the results along
    axis 0 (separate query, key and value projections into one fused ``qkv``). A new kind of step is
    its name in ``STEPS`` and one branch in :func:`apply_steps`.
``groups`` (optional)
    named value lists for ``each`` (below): a mapping of placeholder -> list of values, all lists of
    one group of the same length and taken together (zipped).
``tensors``
    the rows: ``{to: AVDSL NAME, from: CHECKPOINT NAME or [NAMES], how: TRANSFORM, each: [GROUPS]}``.
    ``how`` is optional (default: the tensor as it is). ``each`` lists groups, by name or written
    inline; a row stands for every combination of one entry from each group (the groups multiply),
    with ``{placeholder}`` in ``to`` and ``from`` replaced by the entry's values. ``{i}`` is the
    layer index: a row with ``{i}`` stands for every index at which the avdsl model has the ``to``
    tensor (so the spec's depth decides, and a checkpoint with other depths shows up as missing or
    left-over tensors). ``{i*A}`` and ``{i*A+B}`` (whole numbers) are index arithmetic, for a
    reference that keeps every A-th layer's part in a list of its own: ``to:
    dec.{i*2}.cross_q.weight, from: cross_attn.{i}.q`` stands for avdsl layers 0, 2, 4, ... from the
    reference's entries 0, 1, 2, ...; ``to: dec.{i}.x, from: blocks.{i*2+1}.x`` for the odd ones.
``fixed`` (optional)
    rows for tensors that both sides compute and neither learns (fixed sin-cos position tables): the
    avdsl model keeps its own and the checkpoint's, after ``how``, must equal it (to 1e-4 of its
    largest value; otherwise the spec builds another table and the import is refused).
``unused`` (optional)
    regular expressions (matching whole names) of checkpoint tensors the reference's forward never
    reads; they are reported and not imported.
``own`` (optional)
    regular expressions (matching whole names) of avdsl tensors the reference has no counterpart of
    (a projector the paper adds that the reference code lacks): they keep the values the model is
    built with (its initialisation) and are reported.
``zeros`` (optional)
    regular expressions of avdsl tensors the reference has no counterpart of that compute its
    function when zero (the bias of a layer that has none in the reference): set to zeros, reported.

Every avdsl tensor is set by exactly one row (or is own or zeros), every checkpoint tensor is used
by exactly one row (or by rows taking different parts of it, or is fixed or unused); otherwise
:func:`port` raises :class:`PortError` listing what is missing, what is left over, and every shape
that does not fit (with both names and shapes).
"""
from __future__ import annotations

import itertools
import re
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    import torch

FORMAT_KEYS = ("format", "doc", "spec", "file", "nested_in", "strip_prefix", "transforms", "groups", "tensors",
               "fixed", "unused", "own", "zeros")
ROW_KEYS = ("to", "from", "how", "each")
STEPS = ("permute", "flatten", "reshape", "regrid", "unsqueeze", "parts")
FILE_KINDS = ("torch", "npz")
FIXED_TOLERANCE = 1e-4  # of the largest value of a fixed table
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_INDEX = re.compile(r"\{i(?:\*(\d+))?(?:\+(\d+))?\}")  # {i}, {i*A}, {i*A+B}, {i+B}


class FormatError(ValueError):
    """A format file is not well formed (a defect of the shipped data, or of a format being written)."""


class CheckpointReadError(ValueError):
    """A checkpoint file cannot be read as its format says (too large, not a state dict, unsafe)."""


@dataclass(frozen=True)
class Row:
    """One avdsl tensor (``to``, may hold ``{i}``) from one or more checkpoint tensors after ``steps``."""

    to: str
    sources: tuple[str, ...]
    how: str
    steps: tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Format:
    name: str
    doc: str
    spec: str
    file: str
    nested_in: tuple[str, ...]
    strip_prefix: tuple[str, ...]
    tensors: tuple[Row, ...]
    fixed: tuple[Row, ...]
    unused: tuple[str, ...]
    own: tuple[str, ...] = ()
    zeros: tuple[str, ...] = ()


@dataclass
class Ported:
    """The avdsl state (every tensor of the model), and what of the checkpoint was not imported."""

    state: dict
    fixed: list = field(default_factory=list)  # checkpoint tensors checked against the model's own table
    unused: list = field(default_factory=list)  # checkpoint tensors the reference never reads
    own: list = field(default_factory=list)  # avdsl tensors the reference lacks: the model's own values
    zeros: list = field(default_factory=list)  # avdsl tensors the reference lacks: zeros


@dataclass
class PortError(Exception):
    """The checkpoint does not fit the model as the format maps it."""

    missing: list  # avdsl tensors without a source, and sources the checkpoint lacks
    left_over: list  # checkpoint tensors no row uses
    shapes: list  # "checkpoint NAME [shape] -> (after HOW [shape]) does not fit avdsl NAME [shape]"
    fixed: list = field(default_factory=list)  # fixed tables that differ

    def __str__(self) -> str:
        lines = []
        for title, items in (("missing", self.missing), ("left over", self.left_over),
                             ("shapes that do not fit", self.shapes), ("fixed tables that differ", self.fixed)):
            if items:
                shown = [_clipped(item) for item in summarise(items)]
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {item}" for item in shown[:20]]
                if len(shown) > 20:
                    lines.append(f"  ... and {len(shown) - 20} more (--json lists all)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ reading a format


def format_names() -> list[str]:
    """The shipped formats."""
    folder = resources.files("avdsl.runtime") / "formats"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_format(name: str) -> Format:
    """A shipped format by name (raises KeyError for an unknown one)."""
    if name not in format_names():
        raise KeyError(name)
    text = (resources.files("avdsl.runtime") / "formats" / f"{name}.yaml").read_text(encoding="utf-8")
    return parse_format(yaml.safe_load(text), f"{name}.yaml")


def _names(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise FormatError(f"{where}: expected a name or a list of names, got {value!r}")


def _steps(name: str, value, where: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    if not isinstance(value, list):
        raise FormatError(f"{where}: transform {name!r} must be a list of steps")
    steps = []
    for step in value:
        if not (isinstance(step, dict) and len(step) == 1):
            raise FormatError(f"{where}: transform {name!r}: each step is one of {{{', '.join(STEPS)}: [...]}}")
        (kind, args), = step.items()
        if kind not in STEPS:
            raise FormatError(f"{where}: transform {name!r}: unknown step {kind!r} (known: {', '.join(STEPS)})")
        if not (isinstance(args, list) and args and all(isinstance(a, int) and not isinstance(a, bool) for a in args)):
            raise FormatError(f"{where}: transform {name!r}: {kind} takes a list of whole numbers")
        if kind in ("flatten", "regrid") and len(args) != 2:
            raise FormatError(f"{where}: transform {name!r}: {kind} takes two numbers")
        if kind == "unsqueeze" and len(args) != 1:
            raise FormatError(f"{where}: transform {name!r}: unsqueeze takes one number")
        if kind == "parts" and (len(args) < 3 or args[1] < 1 or len(set(args[2:])) != len(args) - 2
                                or not all(0 <= k < args[1] for k in args[2:])):
            raise FormatError(f"{where}: transform {name!r}: parts takes an axis, a number of parts n, then the "
                              "parts kept (each of 0..n-1 at most once)")
        if kind == "parts" and steps:
            raise FormatError(f"{where}: transform {name!r}: parts comes first (it says which part of the "
                              "checkpoint tensor the row takes)")
        steps.append((kind, tuple(args)))
    return tuple(steps)


def _combinations(each, groups: dict, where: str) -> list[dict]:
    """Every assignment of placeholders the row's ``each`` stands for (groups multiply, lists zip)."""
    if each is None:
        return [{}]
    if not isinstance(each, list):
        raise FormatError(f"{where}: each must be a list of groups")
    resolved = []
    for group in each:
        if isinstance(group, str):
            if group not in groups:
                raise FormatError(f"{where}: no group {group!r} (defined: {', '.join(groups) or 'none'})")
            group = groups[group]
        resolved.append(_group(group, where))
    out = []
    for choice in itertools.product(*resolved):
        merged = {}
        for part in choice:
            if set(part) & set(merged):
                raise FormatError(f"{where}: placeholder {sorted(set(part) & set(merged))[0]!r} set by two groups")
            merged.update(part)
        out.append(merged)
    return out


def _group(group, where: str) -> list[dict]:
    if not (isinstance(group, dict) and group and all(isinstance(v, list) for v in group.values())):
        raise FormatError(f"{where}: a group is a mapping of placeholder -> list of values")
    lengths = {len(v) for v in group.values()}
    if len(lengths) != 1:
        raise FormatError(f"{where}: the lists of a group must have one length, got {sorted(lengths)}")
    if "i" in group:
        raise FormatError(f"{where}: {{i}} is the layer index, not a group placeholder")
    return [{k: str(v[n]) for k, v in group.items()} for n in range(lengths.pop())]


def _fill(template: str, values: dict, where: str) -> str:
    def one(match):
        key = match.group(1)
        if key == "i":
            return "{i}"
        if key not in values:
            raise FormatError(f"{where}: {template!r} uses {{{key}}}, which no group of the row sets")
        return values[key]
    return _PLACEHOLDER.sub(one, template)


def _rows(items, transforms: dict, groups: dict, where: str) -> tuple[Row, ...]:
    if not isinstance(items, list):
        raise FormatError(f"{where}: expected a list of rows")
    rows = []
    for n, item in enumerate(items):
        at = f"{where}[{n}]"
        if not isinstance(item, dict) or "to" not in item or "from" not in item:
            raise FormatError(f"{at}: a row is a mapping with `to` and `from`")
        unknown = sorted(set(item) - set(ROW_KEYS))
        if unknown:
            raise FormatError(f"{at}: unknown key {unknown[0]!r} (known: {', '.join(ROW_KEYS)})")
        how = item.get("how", "copy")
        if how != "copy" and how not in transforms:
            raise FormatError(f"{at}: no transform {how!r} (defined: {', '.join(transforms) or 'none'})")
        to, sources = _names(item["to"], at)[0], _names(item["from"], at)
        if any(m.group(1) is not None and int(m.group(1)) < 1 for t in (to, *sources) for m in _INDEX.finditer(t)):
            raise FormatError(f"{at}: in {{i*A+B}}, A is a whole number of at least 1")
        for values in _combinations(item.get("each"), groups, at):
            filled = tuple(_fill(s, values, at) for s in sources)
            if any(_INDEX.search(s) for s in filled) and not _INDEX.search(to):
                raise FormatError(f"{at}: `from` has {{i}} but `to` does not")
            rows.append(Row(_fill(to, values, at), filled, how, transforms.get(how, ())))
    return tuple(rows)


def parse_format(data, source: str) -> Format:
    """A format from its parsed YAML (see the module docstring); FormatError names what is wrong."""
    if not isinstance(data, dict):
        raise FormatError(f"{source}: a format is a mapping")
    unknown = sorted(set(data) - set(FORMAT_KEYS))
    if unknown:
        raise FormatError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(FORMAT_KEYS)})")
    for key in ("format", "doc", "spec", "file", "tensors"):
        if key not in data:
            raise FormatError(f"{source}: missing key {key!r}")
    if data["file"] not in FILE_KINDS:
        raise FormatError(f"{source}: file must be one of {', '.join(FILE_KINDS)}")
    transforms = {name: _steps(name, steps, source) for name, steps in (data.get("transforms") or {}).items()}
    groups = dict(data.get("groups") or {})
    unused, own, zeros = (tuple(data.get(key) or ()) for key in ("unused", "own", "zeros"))
    for key, patterns in (("unused", unused), ("own", own), ("zeros", zeros)):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise FormatError(f"{source}: {key}: {pattern!r} is not a regular expression ({e})") from None
    return Format(
        name=str(data["format"]), doc=str(data["doc"]), spec=str(data["spec"]), file=data["file"],
        nested_in=tuple(data.get("nested_in") or ()), strip_prefix=tuple(data.get("strip_prefix") or ()),
        tensors=_rows(data["tensors"], transforms, groups, f"{source}: tensors"),
        fixed=_rows(data.get("fixed") or [], transforms, groups, f"{source}: fixed"),
        unused=unused, own=own, zeros=zeros,
    )


# ------------------------------------------------------------------------------ reading a checkpoint


def read_checkpoint(path: str | Path, fmt: Format, max_bytes: int, max_tensors: int) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint file, read as ``fmt.file`` says, names with prefixes stripped.

    Bounded before anything is loaded: the file's size (for ``npz`` the members' uncompressed sizes)
    at most ``max_bytes``, at most ``max_tensors`` tensors. Raises CheckpointReadError.
    """
    import torch
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointReadError(f"{path}: {size:,} bytes, more than the limit of {max_bytes:,}")
    raw = _read_torch(path) if fmt.file == "torch" else _read_npz(path, max_bytes, max_tensors)
    for key in fmt.nested_in:
        if isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if len(raw) > max_tensors:
        raise CheckpointReadError(f"{path}: {len(raw):,} entries, more than the limit of {max_tensors:,}")
    state = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointReadError(f"{path}: entry {str(name)[:80]!r} is a {type(value).__name__}, not a tensor "
                                      "(expected a state dict: names -> tensors)")
        for prefix in fmt.strip_prefix:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name in state:
            raise CheckpointReadError(f"{path}: two entries are named {name!r} once the prefix is removed")
        state[name] = value
    return state


def _read_torch(path: Path) -> dict:
    import pickle

    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(f"{path}: refused: it holds more than tensors and plain containers "
                                  f"({str(e).splitlines()[0][:200]})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointReadError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise CheckpointReadError(f"{path}: holds a {type(raw).__name__}, not a state dict")
    return raw


def _read_npz(path: Path, max_bytes: int, max_tensors: int) -> dict:
    import numpy as np
    import torch

    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointReadError(f"{path}: not an .npz file ({e})") from None
    if len(members) > max_tensors:
        raise CheckpointReadError(f"{path}: {len(members):,} arrays, more than the limit of {max_tensors:,}")
    unpacked = sum(m.file_size for m in members)
    if unpacked > max_bytes:
        raise CheckpointReadError(f"{path}: {unpacked:,} bytes once unpacked, more than the limit of {max_bytes:,}")
    out = {}
    try:
        with np.load(path, allow_pickle=False) as arrays:
            for name in arrays.files:
                value = arrays[name]
                if value.dtype.kind not in "fiub":
                    raise CheckpointReadError(f"{path}: array {name!r} has dtype {value.dtype}, not a number type "
                                              "(save bfloat16 arrays as float32)")
                out[name] = torch.from_numpy(np.ascontiguousarray(value))
    except CheckpointReadError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointReadError(f"{path}: cannot be read as .npz ({type(e).__name__}: {str(e)[:200]})") from None
    return out


# ------------------------------------------------------------------------------ applying a format


def apply_steps(steps, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The avdsl tensor made of ``tensors``: each through ``steps``, then concatenated on axis 0."""
    import torch
    parts = []
    for t in tensors:
        for kind, args in steps:
            if kind == "permute":
                t = t.permute(*args)
            elif kind == "flatten":
                t = t.flatten(*args)
            elif kind == "reshape":
                t = t.reshape(*args)
            elif kind == "regrid":
                axis, rows = args
                length = t.shape[axis]
                if rows < 1 or length % rows:
                    raise ValueError(f"regrid: axis {axis} of length {length} is not a grid of {rows} rows")
                order = torch.arange(length).view(rows, length // rows).T.reshape(-1)
                t = t.index_select(axis, order)
            elif kind == "unsqueeze":
                t = t.unsqueeze(args[0])
            else:  # parts
                axis, n, keep = args[0], args[1], args[2:]
                if t.shape[axis] % n:
                    raise ValueError(f"parts: axis {axis} of length {t.shape[axis]} is not {n} equal parts")
                pieces = t.chunk(n, dim=axis)
                t = torch.cat([pieces[k] for k in keep], dim=axis)
        parts.append(t)
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)).contiguous()


def _at(template: str, i: int) -> str:
    """``template`` with every ``{i}``, ``{i*A}``, ``{i*A+B}`` replaced by its value at layer ``i``."""
    return _INDEX.sub(lambda m: str(int(m.group(1) or 1) * i + int(m.group(2) or 0)), template)


def expand(rows: tuple[Row, ...], names) -> list[Row]:
    """The rows with ``{i}`` (or ``{i*A+B}``) replaced by every ``i`` at which ``names`` (the avdsl
    model's) has the ``to`` tensor."""
    out = []
    for row in rows:
        first = _INDEX.search(row.to)
        if first is None:
            out.append(row)
            continue
        a, b = int(first.group(1) or 1), int(first.group(2) or 0)
        literal = _INDEX.split(row.to)[::3]  # the text between the index expressions
        pattern = re.compile(r"(\d+)".join(re.escape(part) for part in literal) + "$")
        indices = set()
        for name in names:
            m = pattern.match(name)
            n = int(m.group(1)) if m else -1
            if n >= b and (n - b) % a == 0 and _at(row.to, (n - b) // a) == name:
                indices.add((n - b) // a)
        for i in sorted(indices):
            out.append(Row(_at(row.to, i), tuple(_at(s, i) for s in row.sources), row.how, row.steps))
        if not indices:
            out.append(row)  # names no tensor of the model: reported as missing below
    return out


def _shape(t) -> list[int]:
    return list(t.shape)


def port(fmt: Format, checkpoint: dict, model_state: dict) -> Ported:
    """The avdsl state made from ``checkpoint`` as ``fmt`` says, in the dtypes of ``model_state``
    (the model's own ``state_dict()``, also on the meta device). Raises PortError unless every avdsl
    tensor gets exactly one source and every checkpoint tensor is used once (whole, or in parts by
    several rows), fixed or unused."""
    import torch
    names = list(model_state)
    state, used = {}, {}  # used: checkpoint name -> [(avdsl name, the parts it takes or None)]
    missing, shapes, fixed_differ, twice = [], [], [], []
    fixed_names, covered = [], set()  # covered: avdsl tensors a row names (set, or reported why not)
    for kind, rows in (("tensors", fmt.tensors), ("fixed", fmt.fixed)):
        for row in expand(rows, names):
            if row.to not in model_state:
                missing.append(f"{row.to} (the model of this spec has no such tensor)")
                continue
            if row.to in covered:
                twice.append(f"avdsl {row.to}")
            covered.add(row.to)
            absent = [s for s in row.sources if s not in checkpoint]
            missing += [f"{s} (checkpoint, for {row.to})" for s in absent]
            for s in row.sources:
                used.setdefault(s, []).append((row.to, _taken(row.steps)))
            if absent:
                continue
            ours = model_state[row.to]
            try:
                value = apply_steps(row.steps, tuple(checkpoint[s] for s in row.sources))
            except (RuntimeError, ValueError, IndexError) as e:
                shapes.append(f"checkpoint {' + '.join(f'{s} {_shape(checkpoint[s])}' for s in row.sources)} cannot be "
                              f"transformed by {row.how} for avdsl {row.to} {_shape(ours)}: {str(e)[:120]}")
                continue
            if value.shape != ours.shape:
                after = "" if row.how == "copy" else f" (after {row.how}: {_shape(value)})"
                shapes.append(f"checkpoint {' + '.join(f'{s} {_shape(checkpoint[s])}' for s in row.sources)}{after} "
                              f"does not fit avdsl {row.to} {_shape(ours)}")
                continue
            if kind == "fixed":
                fixed_names.append(row.to)
                if ours.device.type != "meta":
                    scale = float(value.abs().max()) if value.numel() else 0.0
                    gap = float((value.double() - ours.double()).abs().max()) if value.numel() else 0.0
                    if gap > FIXED_TOLERANCE * max(scale, 1e-12):
                        fixed_differ.append(f"checkpoint {row.sources[0]} vs avdsl {row.to}: they differ by "
                                            f"{gap:.3g} (largest value {scale:.3g})")
                continue
            state[row.to] = value.to(ours.dtype)
    partly = []
    for s, users in used.items():
        problem = _shared(users)
        if problem == "twice":
            twice.append(f"checkpoint {s} (for {' and '.join(to for to, _ in users)})")
        elif problem:
            partly.append(f"{s} ({problem})")
    if twice:
        raise FormatError(f"format {fmt.name} uses a tensor twice: " + "; ".join(twice[:10]))
    own, zeros = ([n for n in names if n not in covered and any(re.fullmatch(p, n) for p in patterns)]
                  for patterns in (fmt.own, fmt.zeros))
    missing += [f"{n} (avdsl, no row of the format sets it)" for n in sorted(set(names) - covered - set(own) - set(zeros))]
    unused = sorted(k for k in checkpoint if k not in used and any(re.fullmatch(p, k) for p in fmt.unused))
    left = sorted(set(checkpoint) - set(used) - set(unused)) + sorted(partly)
    if missing or left or shapes or fixed_differ:
        raise PortError(missing, left, shapes, fixed_differ)
    for name in fixed_names + own:
        state[name] = model_state[name]
    state.update({name: torch.zeros_like(model_state[name]) for name in zeros})
    return Ported(state, sorted(s for r in expand(fmt.fixed, names) for s in r.sources), unused, sorted(own), sorted(zeros))


def _taken(steps) -> tuple | None:
    """(axis, n, parts) of a transform that takes parts of its checkpoint tensor; None: all of it."""
    if steps and steps[0][0] == "parts":
        axis, n, *keep = steps[0][1]
        return axis, n, frozenset(keep)
    return None


def _shared(users: list) -> str:
    """What is wrong with the rows ``users`` that read one checkpoint tensor: "" (nothing), "twice"
    (two rows read the same values), or which of its parts no row takes."""
    if len(users) == 1 and users[0][1] is None:
        return ""
    taken = [t for _, t in users]
    if any(t is None for t in taken) or len({t[:2] for t in taken}) > 1 or \
            sum(len(t[2]) for t in taken) != len(frozenset().union(*(t[2] for t in taken))):
        return "twice"
    axis, n = taken[0][:2]
    rest = sorted(set(range(n)) - frozenset().union(*(t[2] for t in taken)))
    return f"parts {', '.join(map(str, rest))} of {n} on axis {axis}: no row takes them" if rest else ""


def _clipped(text: str, limit: int = 300) -> str:
    """A line of a message: control characters escaped (names come from the file), at most ``limit`` long."""
    from avdsl.diagnostics import printable

    return printable(text[:limit]) + (" ..." if len(text) > limit else "")


def summarise(names: list[str]) -> list[str]:
    """Names that differ only in their layer numbers as one entry: ``blocks_a.{0-10}.norm1_a.weight``."""
    groups: dict[str, list[int]] = {}
    order = []
    for name in names:
        numbers = re.findall(r"(?<=[._/])\d+(?=[._/])", name)
        key = re.sub(r"(?<=[._/])\d+(?=[._/])", "{#}", name, count=1) if len(numbers) == 1 else name
        if key not in groups:
            groups[key] = []
            order.append(key)
        if key != name:
            groups[key].append(int(numbers[0]))
    out = []
    for key in order:
        found = sorted(groups[key])
        if not found:
            out.append(key)
        elif len(found) == 1:
            out.append(key.replace("{#}", str(found[0])))
        else:
            out.append(key.replace("{#}", "{" + _ranges(found) + "}"))
    return out


def _ranges(numbers: list[int]) -> str:
    spans, start = [], numbers[0]
    for prev, cur in zip(numbers, numbers[1:] + [None]):
        if cur != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(spans)
