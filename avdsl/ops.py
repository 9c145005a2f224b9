"""The operator catalogue: every operator a spec can call, defined once.

An `OpDef` is everything the pipeline knows about one operator: its arguments and their checks, its
shape rule, its cost rule, the runtime object the compiler builds or calls (named by a dotted path, so
the language never imports torch), the facts lint and evaluation read (``contrastive``, ``evaluates``)
and its doc line. The graph builder, the shape and cost passes, codegen, the compiler, lint and the
generated spec reference all read this table and nothing else: adding an operator is one `_add` here
(and, for a new runtime function or module, its implementation under `avdsl.runtime`) plus its test.
Shapes are tuples of ints and symbol names (``"B"``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import expr as ex
from .diagnostics import Loc, SpecError, did_you_mean
from .limits import MAX_ARGUMENT, MAX_SIZE

Shape = tuple


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "int" | "float" | "bool" | "name" | "ints" | "tensor"
    default: object = ...  # ... = required
    keyword: bool = False  # given by name only (`norm=both`), never by position


@dataclass(frozen=True)
class Runtime:
    """A runtime object named by its dotted path under `avdsl.runtime` (``"heads.MLP"``) or in torch
    (``"torch.nn.Linear"``), with its constructor arguments. The compiler resolves and builds it."""

    target: str
    args: tuple = ()


@dataclass(frozen=True)
class OpCost:
    params: int = 0  # trainable and frozen
    frozen: int = 0
    flops: int = 0  # forward, per sample


@dataclass(frozen=True)
class OpDef:
    name: str
    category: str  # tokenizer | position | drop | pool | project | loss | target
    doc: str
    params: tuple[Param, ...]
    # rules, each a pure function of the bound arguments (tensor arguments as shapes, see `Bound`):
    shape: Callable | None = None  # (bound, loc) -> output shape; tokenizers: -> token grid; raises SpecError
    cost: Callable | None = None  # (bound) -> OpCost
    module: Callable | None = None  # (bound) -> Runtime: the module of an operator with weights
    function: str | None = None  # or the runtime function of an operator without weights ("heads.mean")
    positional: bool = False  # the generated call passes non-tensor arguments by position
    choices: dict = field(default_factory=dict)  # param -> allowed names
    # facts other passes read:
    share: str = ""  # the argument naming another output whose module this call runs (no weights of its own)
    weights_if: str = ""  # a bool argument that gives a call weights (its `module`); without it the call is `function`
    contrastive: bool = False  # pulls matching rows of two different views together (lint L402; a retrieval task)
    evaluates: str = ""  # what evaluation scores: classifier | multilabel | reconstruction | caption | average
    input_kinds: tuple = ()  # tokenizers: the input kinds they cut into tokens
    train_only: bool = False  # drops: only in training (the evaluation shape is the input's)
    writes_mask: bool = False  # drops: also writes the mask and restore ids (a stream's `mask:`)
    adds_nothing: bool = False  # positions: no node at all
    # information flow, where rows of the output read different tensors: (args, sources of each tensor
    # argument, their per-row sources or None) -> (the output's sources, its per-row sources or None)
    rows: Callable | None = None


class Bound(dict):
    """Arguments bound to an operator's parameters. While binding, tensor arguments hold their `Ref`;
    the rules see their shapes instead. ``cols`` maps each parameter to the column where it was
    written (for errors); the other attributes are what the rules may read besides the arguments."""

    cols: dict
    op: "OpDef"
    decls: dict  # tensor parameter -> the spec `InputDecl` it reads, when it reads an input directly
    written: dict  # tensor parameter -> the argument as the spec wrote it (`za`, `av.video`), for messages
    kind: str  # tokenizers: the input's kind
    grid: tuple | None  # tokenizers, positions: the token grid
    width: int  # tokenizers, positions: the stream's width
    stream: str  # tokenizers, positions, drops: the stream
    out: tuple  # tokenizers: the output shape (for cost and module)


def bound_for(op: "OpDef", args: dict, **facts) -> Bound:
    """Bound arguments of ``op`` for its rules: ``args`` plus the facts named (see `Bound`)."""
    b = Bound(args)
    b.cols, b.op, b.decls, b.written, b.kind, b.grid, b.width, b.stream, b.out = {}, op, {}, {}, "", None, 0, "", ()
    for key, value in facts.items():
        setattr(b, key, value)
    return b


def bind(op: OpDef, call: ex.Call, loc: Loc) -> Bound:
    """Match a call's arguments to ``op.params``; wrong counts, names and types point at the argument."""
    out, cols = Bound(), {}
    positional = list(call.args)
    params = list(op.params)
    variadic = params and params[0].kind == "tensors"
    if variadic:
        tensors = [a for a in positional]
        if not tensors:
            raise SpecError(loc.shifted(call.col), f"{op.name}() needs at least one tensor", f"e.g. `{op.name}(backbone.audio)`")
        out[params[0].name] = tensors
        cols[params[0].name] = tensors[0].col
        positional, params = [], params[1:]
    params = [p for p in params if not p.keyword]
    if len(positional) > len(params):
        extra = positional[len(params)]
        raise SpecError(loc.shifted(getattr(extra, "col", call.col)), f"{op.name}() takes {len(params)} arguments, got {len(positional)}",
                        f"usage: {usage(op)}")
    for p, a in zip(params, positional):
        out[p.name], cols[p.name] = a, getattr(a, "col", call.col)
    names = [p.name for p in op.params]
    for key, value in call.kwargs:
        if key not in names:
            raise SpecError(loc.shifted(getattr(value, "col", call.col)), f"{op.name}() has no argument '{key}'",
                            did_you_mean(key, names, "an argument"))
        if key in out:
            raise SpecError(loc.shifted(getattr(value, "col", call.col)), f"{op.name}() got '{key}' twice", f"usage: {usage(op)}")
        out[key], cols[key] = value, getattr(value, "col", call.col)
    for p in op.params:
        if p.name not in out:
            if p.default is ...:
                raise SpecError(loc.shifted(call.col), f"{op.name}() is missing its argument '{p.name}'", f"usage: {usage(op)}")
            out[p.name] = p.default
            continue
        out[p.name] = _convert(op, p, out[p.name], loc.shifted(cols.get(p.name, call.col)))
    out.cols = cols
    return out


def _convert(op: OpDef, p: Param, value, loc: Loc):
    if p.kind in ("tensor", "tensors"):
        items = value if isinstance(value, list) else [value]
        for v in items:
            if not isinstance(v, (ex.Ref, ex.Call)):
                raise SpecError(loc, f"argument '{p.name}' of {op.name}() must be a tensor (a name like `backbone.audio`)",
                                f"usage: {usage(op)}")
        return value
    if p.kind == "int":
        if not (isinstance(value, ex.Num) and float(value.value).is_integer()):
            raise SpecError(loc, f"argument '{p.name}' of {op.name}() must be a whole number", f"usage: {usage(op)}")
        if value.value < 1 and p.name not in ("min", "index"):
            raise SpecError(loc, f"argument '{p.name}' of {op.name}() must be at least 1, got {value.value}", f"usage: {usage(op)}")
        if value.value > MAX_SIZE:
            raise SpecError(loc, f"argument '{p.name}' of {op.name}() is {value.value}, more than the limit {MAX_SIZE}",
                            f"usage: {usage(op)}")
        return int(value.value)
    if p.kind == "float":
        if isinstance(value, ex.Neg) and isinstance(value.operand, ex.Num):
            number = -float(value.operand.value)
        elif isinstance(value, ex.Num):
            number = float(value.value)
        else:
            raise SpecError(loc, f"argument '{p.name}' of {op.name}() must be a number", f"usage: {usage(op)}")
        low, high, low_open, high_open = FLOAT_RANGES.get(p.name, (-MAX_ARGUMENT, MAX_ARGUMENT, False, False))
        if number < low or number > high or (low_open and number == low) or (high_open and number == high):
            want = f"{'more than' if low_open else 'at least'} {low:g} and {'less than' if high_open else 'at most'} {high:g}"
            raise SpecError(loc, f"argument '{p.name}' of {op.name}() is {number:g}; it must be {want}", f"usage: {usage(op)}")
        return number
    if p.kind == "bool":
        if isinstance(value, ex.Ref) and value.name in ("true", "false", "True", "False"):
            return value.name.lower() == "true"
        if isinstance(value, ex.Num) and value.value in (0, 1):
            return bool(value.value)
        raise SpecError(loc, f"argument '{p.name}' of {op.name}() must be true or false", f"usage: {usage(op)}")
    if p.kind == "name":
        if not (isinstance(value, ex.Ref) and len(value.parts) == 1) and not isinstance(value, ex.Str):
            raise SpecError(loc, f"argument '{p.name}' of {op.name}() must be a name", f"usage: {usage(op)}")
        name = value.value if isinstance(value, ex.Str) else value.name
        allowed = op.choices.get(p.name)
        if allowed and name not in allowed:
            raise SpecError(loc, f"'{name}' is not a choice for '{p.name}' of {op.name}()", did_you_mean(name, allowed, "a choice"))
        return name
    if p.kind == "ints":
        items = value.items if isinstance(value, ex.ListExpr) else (value,)
        if not items or not all(isinstance(i, ex.Num) and float(i.value).is_integer() and 1 <= i.value <= MAX_SIZE for i in items):
            raise SpecError(loc, f"argument '{p.name}' of {op.name}() must be a list of positive whole numbers", f"usage: {usage(op)}")
        return [int(i.value) for i in items]
    return value


# (low, high, low excluded, high excluded) of float arguments, by name; others lie within +-MAX_ARGUMENT
FLOAT_RANGES = {
    "tau": (0.0, 100.0, True, False),  # a temperature divides the logits
    "gamma": (0.0, 100.0, False, False),
    "label_smoothing": (0.0, 1.0, False, True),
    "eps": (0.0, 1.0, True, False),  # a LayerNorm's epsilon
}


# where a raw input of a non-signal kind may be passed: (operator, argument) -> the kinds allowed there
INPUT_ARGUMENTS = {("ce", "target"): ("label",), ("bce", "target"): ("multilabel",), ("next_token", "tokens"): ("text",),
                   ("patches", "x"): ("fbank", "image", "video")}
SIGNAL_KINDS = ("fbank", "image", "video", "waveform")
INPUT_EXAMPLES = {"ce": "e.g. `ce(logits, label)` with `label[B]: label(10)`",
                   "bce": "e.g. `bce(logits, labels)` with `labels[B, 527]: multilabel(527)`",
                   "next_token": "e.g. `next_token(logits, caption)` with `caption[B, 16]: text`",
                   "patches": "e.g. `patches(fbank, [16, 16])`"}


def has_module(op: OpDef, args: dict) -> bool:
    """Whether a call of ``op`` with ``args`` builds a module with weights (else it calls ``op.function``,
    or, with ``share``, runs the module of another output)."""
    if op.module is None or (op.share and args.get(op.share)):
        return False
    return not op.weights_if or bool(args.get(op.weights_if))


def _learned_tau(*fixed: str) -> Callable:
    """The module of a contrastive loss with ``learn_tau=true``: its function (by name in `losses`) with a
    learned temperature; ``fixed`` names the other arguments it passes on."""
    return lambda b: Runtime("losses.LearnedTemperature", (b.op.function.rsplit(".", 1)[1], b["tau"],
                                                          tuple((k, b[k]) for k in fixed)))


def usage(op: OpDef) -> str:
    parts = []
    for p in op.params:
        if p.kind == "tensors":
            parts.append(f"{p.name}...")
        elif p.default is ...:
            parts.append(p.name)
        else:
            d = p.default
            parts.append(f"{p.name}={str(d).lower() if isinstance(d, bool) else d}")
    return f"{op.name}({', '.join(parts)})"


def args_text(op: OpDef, args: dict) -> str:
    """Non-tensor arguments as written in a call: ``out=10, bias=true``."""
    return ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in args.items() if k != op.share) or "none"


def fail(loc: Loc, message: str, hint: str = "") -> SpecError:
    return SpecError(loc, message, hint)


# ------------------------------------------------------------------------------ rule helpers


def fmt(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def size_of(x) -> int:
    """A size as a number (symbolic sizes count as 1 in costs)."""
    return x if isinstance(x, int) else 1


def divisors(dim: int, near: int) -> list[int]:
    ds = [d for d in range(1, dim + 1) if dim % d == 0]
    return sorted(ds, key=lambda d: abs(d - near))[:3]


def _same(b: Bound, loc: Loc) -> Shape:
    return b["x"]


# tokenizers: the bound input shape is ``x``; ``b.kind`` is the input's kind


_LAYOUTS = {"video": "[B, C, T, H, W]", "image": "[B, C, H, W]", "fbank": "[B, T, F]", "waveform": "[B, S]", "text": "[B, L]"}


def _grid(b: Bound, loc: Loc, dims, sizes, names) -> tuple:
    """The token grid of non-overlapping windows ``sizes`` over ``dims``; each size must divide its dim."""
    if b.kind not in b.op.input_kinds:
        wanted = " or ".join(f"{k} input {_LAYOUTS[k]}" for k in b.op.input_kinds)
        others = [f"{usage(op)} for {' and '.join(op.input_kinds)}" for op in OPS.values() if b.kind in op.input_kinds]
        raise fail(loc, f"{b.op.name}() tokenizes a {wanted}; '{b.decls['x'].name}' is {b.kind} {fmt(b['x'])}",
                   "use " + (", ".join(others) if others else "another tokenizer"))
    grid = []
    for dim, size, name in zip(dims, sizes, names):
        if isinstance(dim, int) and dim % size:
            raise SpecError(loc, f"{b.op.name} size {size} does not divide the input's {name} {dim} (input {fmt(b['x'])})",
                            f"choose a size that divides {dim}, e.g. {', '.join(str(d) for d in divisors(dim, size))}", code="H302")
        grid.append(dim // size if isinstance(dim, int) else dim)
    return tuple(grid)


def _channels(b: Bound) -> int:
    """Input channels of a patch tokenizer: ``channels=`` if given, else the input's (1 for spectrograms)."""
    return b.get("channels") or (size_of(b["x"][1]) if b.kind in ("image", "video") else 1)


def _patch_cost(window: Callable) -> Callable:
    def cost(b: Bound) -> OpCost:
        width, tokens = b.width, size_of(b.out[1])
        per = _channels(b) * window(b)
        norm = b.get("norm", "none")
        norms = (2 * per if norm in ("before", "both") else 0) + (2 * width if norm in ("after", "both") else 0)
        # a LayerNorm costs about 5 FLOPs per value it normalises (its parameters are 2 per value)
        return OpCost(per * width + width + norms, 0, 2 * tokens * per * width + 5 * tokens * norms // 2)
    return cost


# the LayerNorms a patch tokenizer may put around its projection (`norm=`), with their epsilon
REDUCTIONS = ("mean", "sum")  # how a loss reduces its per-item terms (`bce` adds `sum_classes`)
TOKEN_NORMS = ("none", "before", "after", "both")
_TOKEN_NORM_PARAMS = (Param("norm", "name", "none", keyword=True), Param("eps", "float", 1e-5, keyword=True))
_TOKEN_NORM_DOC = (" `norm=before|after|both` puts a LayerNorm (weight and bias, epsilon `eps`) on the patch values before "
                   "the projection, on the tokens after it, or both (the Zorro port's tokenizers).")


def _embed_cost(b: Bound) -> OpCost:
    dim = b["dim"] or b.width
    params = b["vocab"] * dim + ((dim * b.width + b.width) if b["dim"] else 0)
    return OpCost(params, b["vocab"] * dim if b["frozen"] else 0, 2 * size_of(b.out[1]) * dim * b.width if b["dim"] else 0)


# positions: the bound token shape is ``x``; ``b.grid`` its grid, ``b.width`` the stream's width


def _learned_check(b: Bound, loc: Loc) -> Shape:
    n = b["x"][1]
    if b["size"] and isinstance(n, int) and b["size"] < n:
        raise fail(loc, f"learned({b['size']}) has fewer positions than the stream's {n} tokens", f"use learned() (one per token) or learned({n})")
    return b["x"]


def _needs_grid(b: Bound, loc: Loc) -> None:
    if b.grid is None:
        raise fail(loc, f"{b.op.name}() needs a token grid; stream '{b.stream}' has none (latent or continued tokens)", "use learned() here")


def _factorized_check(b: Bound, loc: Loc) -> Shape:
    _needs_grid(b, loc)
    return b["x"]


def _sincos_check(b: Bound, loc: Loc) -> Shape:
    _needs_grid(b, loc)
    if len(b.grid) != 2:
        raise fail(loc, f"sincos2d() needs a 2-D token grid; stream '{b.stream}' has a {len(b.grid)}-D grid {b.grid}",
                   "use factorized() or learned() for video tubelets")
    if b.width % 4:
        raise fail(loc, f"sincos2d() needs a width divisible by 4, got {b.width}", "choose a width divisible by 4")
    return b["x"]


def _norm_extra(b: Bound) -> int:
    return 2 * b.width if b["norm"] else 0


# outputs and losses: tensor arguments are bound to their shapes; ``b.decls`` names inputs read directly


def _pool_shape(b: Bound, loc: Loc) -> Shape:
    shapes = b["x"]
    widths = {s[-1] for s in shapes}
    if len(widths) > 1:
        raise fail(loc, f"{b.op.name}() pools tensors of different widths {sorted(widths, key=str)}",
                   "pool streams of one width, or project them to one width first")
    for s in shapes:
        if len(s) != 3:
            raise fail(loc, f"pooling expects token tensors [B, N, D], got a tensor of shape {fmt(s)}",
                       "pool encoder outputs like `backbone.audio`")
    return (shapes[0][0], shapes[0][-1])


def _attnpool_shape(b: Bound, loc: Loc) -> Shape:
    shapes = b["x"]
    for s in shapes:
        if len(s) not in (2, 3):
            raise fail(loc, f"attnpool() attends to token tensors [B, N, D] (or one pooled token [B, D]), got a tensor "
                       f"of shape {fmt(s)}", "pass encoder outputs like `backbone.audio`")
    widths = {s[-1] for s in shapes}
    if len(widths) > 1:
        raise fail(loc, f"attnpool() attends to tensors of different widths {sorted(widths, key=str)}",
                   "pool streams of one width, or project them to one width first")
    batch, width = shapes[0][0], shapes[0][-1]
    if b["queries"] < 1 or b["heads"] < 1:
        raise fail(loc, f"attnpool() needs at least one query and one head, got queries={b['queries']}, heads={b['heads']}",
                   "e.g. `attnpool(backbone.audio, queries=1, heads=4)`")
    if width % b["heads"]:
        raise SpecError(loc, f"attnpool(): {b['heads']} heads do not divide the width {width}",
                        f"use heads that divide {width}, e.g. {', '.join(str(d) for d in divisors(width, b['heads']))}", code="H301")
    if b["each"] and b["queries"] != len(shapes):
        raise fail(loc, f"attnpool(each=true) has one query per tensor: {len(shapes)} tensors but queries={b['queries']}",
                   f"write queries={len(shapes)}")
    return (batch, width) if b["queries"] == 1 else (batch, b["queries"], width)


def _attnpool_cost(b: Bound) -> OpCost:
    """Learned queries, the query projection of each query, key and value projections of every token,
    attention, and the output projection (`torch.nn.MultiheadAttention`); the queries' LayerNorm."""
    d, q = b["x"][0][-1], b["queries"]
    n = sum(size_of(s[1]) if len(s) == 3 else 1 for s in b["x"])
    norm = (2 * d if b["bias"] else d) if b["norm"] else 0
    params = q * d + 4 * d * d + (4 * d if b["bias"] else 0) + norm
    return OpCost(params, 0, 2 * d * d * (2 * q + 2 * n) + 4 * q * n * d)


def _attnpool_rows(args: dict, sources: list, rows: list) -> tuple:
    """With ``each``, query i reads only the i-th tensor: its row depends on that tensor's sources."""
    union = frozenset().union(*sources)
    return (union, tuple(sources)) if args["each"] else (union, None)


def _pick_rows(args: dict, sources: list, rows: list) -> tuple:
    return (rows[0][args["index"]], None) if rows[0] is not None else (sources[0], None)


def _pick_shape(b: Bound, loc: Loc) -> Shape:
    x, name = b["x"], b.written.get("x", "x")
    if len(x) != 3:
        raise fail(loc, f"pick() takes one token of a tensor [B, N, D]; '{name}' is {fmt(x)}", "pick from tokens or several queries' pooling")
    if isinstance(x[1], int) and b["index"] >= x[1]:
        raise fail(loc, f"pick(): index {b['index']} is past the last of the {x[1]} tokens of '{name}' {fmt(x)}",
                   f"use an index from 0 to {x[1] - 1}")
    return (x[0], x[2])


def _avg_shape(b: Bound, loc: Loc) -> Shape:
    shapes = b["x"]
    if len({tuple(s) for s in shapes}) > 1:
        raise fail(loc, "avg() averages tensors of one shape, got " + ", ".join(fmt(s) for s in shapes),
                   "average outputs of the same head size")
    return shapes[0]


def _tokens_shape(b: Bound, loc: Loc) -> Shape:
    x = b["x"]
    return (x[0], x[1] - b["skip"], x[2]) if isinstance(x[1], int) else x


def _same_rows(b: Bound, loc: Loc, a: str, c: str) -> None:
    """A contrastive loss compares one embedding per example on each side, of one width; the
    arguments are named as written."""
    names = {p: b.written.get(p, p) for p in (a, c)}
    for p in (a, c):
        if len(b[p]) != 2:
            raise fail(loc, f"{b.op.name}() compares one embedding per example [B, D], but '{names[p]}' is "
                       f"{'unpooled tokens ' if len(b[p]) == 3 else ''}{fmt(b[p])}",
                       f"pool it first, e.g. `mean({names[p]})`, and project both sides to one width")
    if b[a][-1] != b[c][-1]:
        raise fail(loc, f"{b.op.name}() compares embeddings of different widths: '{names[a]}' is {fmt(b[a])}, "
                   f"'{names[c]}' is {fmt(b[c])}", f"project both to one width, e.g. `linear({names[a]}, {b[c][-1]})`")


def _nce_shape(b, loc):
    _same_rows(b, loc, "a", "b")
    return ()


def _milnce_shape(b, loc):
    _same_rows(b, loc, "video", "text")
    return ()


def _mse_shape(b, loc):
    if tuple(b["pred"])[-2:] != tuple(b["target"])[-2:]:
        raise fail(loc, f"masked_mse: prediction {fmt(b['pred'])} and target {fmt(b['target'])} differ",
                   "predict one row of patch values per patch: `linear(decoder.audio, VALUES_PER_PATCH)`")
    if tuple(b["mask"]) != tuple(b["pred"][:2]):
        raise fail(loc, f"masked_mse: the mask {fmt(b['mask'])} does not match the prediction {fmt(b['pred'])}",
                   "pass the mask of the stream the prediction reconstructs, e.g. `audio.mask`")
    return ()


def _class_target(b: Bound, loc: Loc, kind: str, other: str) -> None:
    """ce/bce: the logits' class count and the target input's kind must match the target."""
    logits, decl = b["logits"], b.decls.get("target")
    if decl is not None and decl.classes and logits[-1] != decl.classes:
        raise fail(loc, f"{b.op.name}(): the logits have {logits[-1]} classes but '{decl.name}' has {decl.classes}",
                   f"make the classifier `linear(..., {decl.classes})`")
    if decl is not None and decl.kind != kind:
        raise fail(loc, f"{b.op.name}() needs {'class indices' if kind == 'label' else '0/1 targets'}; '{decl.name}' is {decl.kind}",
                   f"use {other}() for {'multilabel targets' if kind == 'label' else 'class indices'}")


def _ce_shape(b, loc):
    _class_target(b, loc, "label", "bce")
    if len(b["logits"]) != 2:
        raise fail(loc, f"ce() takes logits [B, classes], got {fmt(b['logits'])}", "pool tokens before the classifier")
    return ()


def _bce_shape(b, loc):
    _class_target(b, loc, "multilabel", "ce")
    return ()


def _next_token_shape(b, loc):
    decl = b.decls.get("tokens")
    if decl is None or decl.kind != "text":
        raise fail(loc, "next_token() predicts the tokens of a text input", "pass the text input, e.g. `next_token(logits, caption)`")
    logits = b["logits"]
    if len(logits) != 3:
        raise fail(loc, f"next_token() takes logits [B, L, vocab], got {fmt(logits)}", "apply a linear head to the text tokens")
    if isinstance(logits[1], int) and isinstance(decl.dims[1], int) and logits[1] != decl.dims[1]:
        raise fail(loc, f"next_token(): the logits have {logits[1]} positions but '{decl.name}' has {decl.dims[1]} tokens",
                   "compute the logits from the text stream's tokens, e.g. `linear(decoder.text, VOCAB)`")
    return ()


def _dense(n_params: Callable) -> Callable:
    """The cost of a layer applied to every row of ``x``: its parameters, 2 FLOPs per weight per row."""
    def cost(b: Bound) -> OpCost:
        p = n_params(b)
        rows = 1
        for d in b["x"][1:-1]:
            rows *= size_of(d)
        return OpCost(p, 0, 2 * rows * p)
    return cost


def _linear_shape(b, loc):
    return tuple(b["x"][:-1]) + (b["out"],)


def _linear_params(b):
    if b.get("shared"):
        return 0  # the weights belong to the output named by `shared`
    return b["x"][-1] * b["out"] + (b["out"] if b["bias"] else 0)


def _mlp_shape(b, loc):
    return tuple(b["x"][:-1]) + (b["sizes"][-1],)


def _mlp_params(b):
    total, width = 0, b["x"][-1]
    for i, size in enumerate(b["sizes"]):
        total += width * size + (size if b["bias"] else 0)
        last = i == len(b["sizes"]) - 1
        if b["norm"] != "none" and (not last or b["final_norm"]):
            total += 2 * size
        width = size
    return total


def _norm_params(b):
    return 2 * b["x"][-1]


def _patches_shape(b, loc):
    if b.decls.get("x") is None:
        raise fail(loc, "patches() cuts an input into patch rows", "e.g. `patches(fbank, [16, 16])`")
    x, size = b["x"], b["size"]
    if len(size) not in (2, 3):
        raise fail(loc, "patches() takes a 2-D patch (h, w) or a 3-D tubelet (t, h, w)", "e.g. `patches(fbank, [16, 16])`")
    if len(size) == 2:
        spatial = x[-2:]
        channels = x[1] if len(x) == 4 else 1
    else:
        spatial = x[-3:]
        channels = x[1]
    for dim, p in zip(spatial, size):
        if isinstance(dim, int) and dim % p:
            raise fail(loc, f"patch size {p} does not divide input size {dim} of {fmt(x)}", "choose a patch size that divides the input")
    count = 1
    per = channels if isinstance(channels, int) else 1
    for dim, p in zip(spatial, size):
        count *= dim // p
        per *= p
    return (x[0], count, per)


# -------------------------------------------------------------------------------- the catalogue

T = Param


OPS: dict[str, OpDef] = {}


def _add(op: OpDef) -> None:
    OPS[op.name] = op


# tokenizers (used in `streams.*.tokenizer`): the shape rule returns the token grid
_add(OpDef("patch2d", "tokenizer", "Split an image or spectrogram into non-overlapping h x w patches, each linearly projected (ViT, AST); "
           "`channels=3` repeats a one-channel spectrogram to 3 channels first (MBT's reference, for RGB-ViT weights)."
           + _TOKEN_NORM_DOC,
           (T("h", "int"), T("w", "int"), T("channels", "int", 0), *_TOKEN_NORM_PARAMS), input_kinds=("image", "fbank"),
           shape=lambda b, loc: _grid(b, loc, b["x"][-2:], (b["h"], b["w"]),
                                      ("height", "width") if b.kind == "image" else ("time frames", "mel bins")),
           cost=_patch_cost(lambda b: b["h"] * b["w"]), choices={"norm": TOKEN_NORMS},
           module=lambda b: Runtime("embeddings.PatchEmbed2d", (_channels(b), b["h"], b["w"], b.width, b["norm"], b["eps"]))))
_add(OpDef("tubelet", "tokenizer", "Split a video into non-overlapping t x h x w tubelets, each linearly projected (ViViT, VATT, MBT)."
           + _TOKEN_NORM_DOC,
           (T("t", "int"), T("h", "int"), T("w", "int"), *_TOKEN_NORM_PARAMS), input_kinds=("video",),
           shape=lambda b, loc: _grid(b, loc, b["x"][-3:], (b["t"], b["h"], b["w"]), ("frames", "height", "width")),
           cost=_patch_cost(lambda b: b["t"] * b["h"] * b["w"]), choices={"norm": TOKEN_NORMS},
           module=lambda b: Runtime("embeddings.TubeletEmbed", (_channels(b), b["t"], b["h"], b["w"], b.width, b["norm"], b["eps"]))))
_add(OpDef("wave1d", "tokenizer", "Split a raw waveform into non-overlapping windows of k samples, each linearly projected (VATT's WaT)."
           + _TOKEN_NORM_DOC,
           (T("k", "int"), *_TOKEN_NORM_PARAMS), input_kinds=("waveform",),
           shape=lambda b, loc: _grid(b, loc, b["x"][-1:], (b["k"],), ("samples",)),
           cost=_patch_cost(lambda b: b["k"]), choices={"norm": TOKEN_NORMS},
           module=lambda b: Runtime("embeddings.WaveEmbed", (b["k"], b.width, b["norm"], b["eps"]))))
_add(OpDef("embed", "tokenizer", "Look up token ids in an embedding table; with `dim`, embed at `dim` then project linearly to the width.",
           (T("vocab", "int"), T("dim", "int", 0), T("frozen", "bool", False)), input_kinds=("text",),
           shape=lambda b, loc: _grid(b, loc, b["x"][1:2], (1,), ("length",)), cost=_embed_cost,
           module=lambda b: Runtime("embeddings.TextEmbed", (b["vocab"], b.width, b["dim"], b["frozen"]))))
# positional encodings: the shape rule checks the grid and width
_add(OpDef("learned", "position", "Learned positional embedding, one row per token position (or `size` buckets); "
           "with `norm=true` the sum of tokens and positions is LayerNorm-ed (VATT).",
           (T("size", "int", 0), T("norm", "bool", False)), shape=_learned_check,
           cost=lambda b: OpCost((b["size"] or size_of(b["x"][1])) * b.width + _norm_extra(b)),
           module=lambda b: Runtime("embeddings.LearnedPosition", (b["size"] or b["x"][1], b.width, b["norm"]))))
_add(OpDef("factorized", "position", "Learned factorised positions: one table per grid axis (time, height, width), summed and added; with `norm=true` the sum of tokens and positions is LayerNorm-ed (VATT).",
           (T("norm", "bool", False),), shape=_factorized_check,
           cost=lambda b: OpCost(sum(size_of(g) for g in b.grid) * b.width + _norm_extra(b)),
           module=lambda b: Runtime("embeddings.FactorizedPosition", (b.grid, b.width, b["norm"]))))
_add(OpDef("sincos2d", "position", "Fixed 2-D sine-cosine positions over the token grid (MAE); stored as a frozen parameter. "
           "The first half of the channels encodes the grid column, as MAE's table; `first=rows` encodes the row first.",
           (T("first", "name", "columns"),), choices={"first": ("columns", "rows")},
           shape=_sincos_check, cost=lambda b: OpCost(size_of(b["x"][1]) * b.width, size_of(b["x"][1]) * b.width),
           module=lambda b: Runtime("embeddings.SinCos2dPosition", (b.grid, b.width, b["first"]))))
_add(OpDef("none", "position", "No positional encoding.", (), adds_nothing=True))
# token dropping: the bound token shape is ``x``
_add(OpDef("droptoken", "drop", "In training only, keep a random `1 - rate` fraction of the tokens (VATT's DropToken).",
           (T("rate", "float"),), train_only=True, module=lambda b: Runtime("embeddings.DropToken", (b["rate"], b["x"][1]))))
_add(OpDef("dropmodality", "drop", "In training only, replace the whole stream of a random `rate` fraction of the examples by "
           "one learned 'missing' token, repeated (modality dropout); the token count does not change.",
           (T("rate", "float"),), shape=lambda b, loc: tuple(b["x"]), cost=lambda b: OpCost(b["x"][-1]), train_only=True,
           module=lambda b: Runtime("embeddings.DropModality", (b["rate"], b["x"][-1]))))
_add(OpDef("random_mask", "drop", "MAE masking: keep a random `1 - rate` fraction of tokens (always); records the mask for restore and losses. "
           "`random_mask(0)` keeps every token in place (an all-zero mask): masking off, `restore:` and masked losses still work.",
           (T("rate", "float"),), writes_mask=True, module=lambda b: Runtime("embeddings.RandomMask", (b["rate"], b["x"][1]))))
# outputs: pooling, projections, heads
_add(OpDef("mean", "pool", "Mean over tokens; several streams are pooled together as one sequence.", (T("x", "tensors"),),
           _pool_shape, function="heads.mean"))
_add(OpDef("first", "pool", "The first token (a CLS or aggregation token).", (T("x", "tensors"),), _pool_shape, function="heads.first"))
_add(OpDef("attnpool", "pool", "Attention pooling: `queries` learned query tokens attend to the tokens (several streams "
           "as one sequence; a pooled [B, D] counts as one token) with `heads` heads; one query gives [B, D], more give "
           "[B, queries, D] (CoCa, Zorro's port). `each=true`: query i attends to the i-th tensor only; `norm=true`: "
           "the queries are LayerNorm-ed (epsilon `eps`) before their projection; `residual=true`: the queries are added "
           "to the result; `bias=false`: no biases in the projections (nor in that LayerNorm).",
           (T("x", "tensors"), T("queries", "int", 1), T("heads", "int", 8), T("each", "bool", False), T("norm", "bool", False),
            T("residual", "bool", False), T("bias", "bool", True), T("eps", "float", 1e-5)), _attnpool_shape, _attnpool_cost,
           module=lambda b: Runtime("heads.AttentionPool", (b["x"][0][-1], b["queries"], b["heads"], b["each"], b["norm"],
                                                            b["residual"], b["bias"], b["eps"])), rows=_attnpool_rows))
_add(OpDef("pick", "pool", "Token `index` (from 0) of [B, N, D] tokens, as [B, D] (e.g. one query of an `attnpool` with several).",
           (T("x", "tensor"), T("index", "int")), _pick_shape, function="heads.pick", rows=_pick_rows))
_add(OpDef("avg", "pool", "Element-wise mean of tensors of one shape (e.g. averaging per-modality logits).", (T("x", "tensors"),),
           _avg_shape, function="heads.avg", evaluates="average"))
_add(OpDef("tokens", "pool", "The tokens of a stream, dropping `skip` leading ones (e.g. CLS).", (T("x", "tensor"), T("skip", "int", 0)),
           _tokens_shape, function="heads.tokens"))
PLAIN_OUTPUT = "tokens"  # what an output that names a tensor without a call (`za: backbone.audio`) means
_add(OpDef("linear", "project", "A linear layer to `out` features; `shared=NAME` reuses the weights of the linear output NAME "
           "(one classifier applied to several inputs, as MBT's per-modality CLS tokens).",
           (T("x", "tensor"), T("out", "int"), T("bias", "bool", True), T("shared", "name", "")),
           _linear_shape, _dense(_linear_params), share="shared",
           module=lambda b: Runtime("torch.nn.Linear", (b["x"][-1], b["out"], b["bias"]))))
_add(OpDef("mlp", "project", "Linear layers of the given sizes with a norm and activation between them (e.g. MMV/VATT heads).",
           (T("x", "tensor"), T("sizes", "ints"), T("norm", "name", "bn"), T("act", "name", "relu"), T("bias", "bool", True),
            T("final_norm", "bool", True)), _mlp_shape, _dense(_mlp_params),
           module=lambda b: Runtime("heads.MLP", (b["x"][-1], b["sizes"], b["norm"], b["act"], b["bias"], b["final_norm"])),
           choices={"norm": ("bn", "ln", "none"), "act": ("relu", "gelu", "none")}))
_add(OpDef("bn", "project", "BatchNorm over features.", (T("x", "tensor"),), _same, _dense(_norm_params),
           module=lambda b: Runtime("heads.BatchNorm", (b["x"][-1],))))
_add(OpDef("layernorm", "project", "LayerNorm over features.", (T("x", "tensor"),), _same, _dense(_norm_params),
           module=lambda b: Runtime("torch.nn.LayerNorm", (b["x"][-1],))))
_add(OpDef("relu", "project", "ReLU.", (T("x", "tensor"),), _same, function="heads.relu"))
_add(OpDef("l2norm", "project", "Scale rows to unit length.", (T("x", "tensor"),), _same, function="heads.l2norm"))
_add(OpDef("patches", "target", "Patch rows of an input, in tokenizer order: the reconstruction target of an MAE.",
           (T("x", "tensor"), T("size", "ints")), _patches_shape, function="losses.patchify", positional=True))
# losses
_add(OpDef("nce", "loss", "Softmax InfoNCE between row-aligned embeddings (both directions by default); "
           "`learn_tau=true` learns the temperature from `tau` (CLIP's logit scale, capped at 100).",
           (T("a", "tensor"), T("b", "tensor"), T("tau", "float", 0.07), T("both", "bool", True), T("learn_tau", "bool", False)),
           _nce_shape, lambda b: OpCost(1 if b["learn_tau"] else 0), _learned_tau("both"), function="losses.nce",
           weights_if="learn_tau", contrastive=True))
_add(OpDef("mil_nce", "loss", "MIL-NCE between video and (several) text embeddings (VATT, MIL-NCE).",
           (T("video", "tensor"), T("text", "tensor"), T("tau", "float", 0.07), T("normalize", "bool", False)), _milnce_shape,
           function="losses.mil_nce", contrastive=True))
_add(OpDef("focal_contrastive", "loss", "Sigmoid focal loss over the image-text similarity matrix (RO-ViT, MaMMUT); "
           "`learn_tau=true` learns the temperature from `tau` (as `nce`).",
           (T("a", "tensor"), T("b", "tensor"), T("tau", "float", 0.07), T("gamma", "float", 2.0), T("learn_tau", "bool", False)),
           _nce_shape, lambda b: OpCost(1 if b["learn_tau"] else 0), _learned_tau("gamma"),
           function="losses.focal_contrastive", weights_if="learn_tau", contrastive=True))
_add(OpDef("masked_mse", "loss", "Mean squared error on masked patches only, against per-patch normalised targets (MAE); "
           "`reduction=sum` sums over the masked patches instead of averaging.",
           (T("pred", "tensor"), T("target", "tensor"), T("mask", "tensor"), T("norm_pix", "bool", True),
            T("reduction", "name", "mean")), _mse_shape,
           choices={"reduction": REDUCTIONS}, function="losses.masked_mse", evaluates="reconstruction"))
_add(OpDef("ce", "loss", "Softmax cross-entropy against class indices; `reduction=sum` sums over the batch instead of averaging.",
           (T("logits", "tensor"), T("target", "tensor"), T("label_smoothing", "float", 0.0), T("reduction", "name", "mean")),
           _ce_shape, choices={"reduction": REDUCTIONS}, function="losses.ce", evaluates="classifier"))
_add(OpDef("bce", "loss", "Sigmoid cross-entropy against 0/1 targets (multi-label); `reduction=sum_classes` sums over classes "
           "and averages over the batch (scenic, MBT) instead of averaging over both.",
           (T("logits", "tensor"), T("target", "tensor"), T("reduction", "name", "mean")),
           _bce_shape, choices={"reduction": REDUCTIONS + ("sum_classes",)}, function="losses.bce", evaluates="multilabel"))
_add(OpDef("next_token", "loss", "Next-token cross-entropy over a caption, ignoring padding: the mean over real target "
           "tokens, or with `reduction=sum` their sum.",
           (T("logits", "tensor"), T("tokens", "tensor"), T("reduction", "name", "mean")), _next_token_shape,
           choices={"reduction": REDUCTIONS}, function="losses.next_token", evaluates="caption"))


def of_category(category: str) -> list[OpDef]:
    return [op for op in OPS.values() if op.category == category]



def get(name: str, category: str | tuple, loc: Loc) -> OpDef:
    """The operator ``name`` of the given category, or an error with the closest names."""
    cats = (category,) if isinstance(category, str) else category
    op = OPS.get(name)
    if op is None or op.category not in cats:
        choices = [n for n, o in OPS.items() if o.category in cats]
        where = " or ".join(cats)
        if op is not None:
            raise SpecError(loc, f"'{name}' is a {op.category} operator, not a {where} operator here",
                            did_you_mean(name, choices, f"a {where} operator"))
        raise SpecError(loc, f"unknown {where} operator '{name}'", did_you_mean(name, choices, f"a {where} operator"))
    return op
