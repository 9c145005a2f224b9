"""The operator catalogue: every operator a spec can call, defined once.

Each `OpDef` gives the operator's arguments, a one-line doc, and pure rules for its output shape and
its parameter count. The shape pass, the cost pass, lint and the docs all read this table; the runtime
implements each operator under the same name. Shapes are tuples of ints and symbol names (``"B"``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import expr as ex
from .diagnostics import Loc, SpecError, did_you_mean

Shape = tuple


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "int" | "float" | "bool" | "name" | "ints" | "tensor"
    default: object = ...  # ... = required


@dataclass(frozen=True)
class OpDef:
    name: str
    category: str  # tokenizer | position | drop | pool | project | loss | target
    doc: str
    params: tuple[Param, ...]
    shape: Callable | None = None  # (bound args with tensor shapes, loc) -> Shape
    n_params: Callable | None = None  # (bound args with tensor shapes) -> int
    choices: dict = field(default_factory=dict)  # param -> allowed names


class Bound(dict):
    """Arguments bound to an operator's parameters. Tensor arguments hold their `Ref`; ``cols`` maps
    each parameter to the column where it was written (for errors)."""

    cols: dict


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
        if value.value < 1 and p.name not in ("min",):
            raise SpecError(loc, f"argument '{p.name}' of {op.name}() must be at least 1, got {value.value}", f"usage: {usage(op)}")
        return int(value.value)
    if p.kind == "float":
        if isinstance(value, ex.Neg) and isinstance(value.operand, ex.Num):
            return -float(value.operand.value)
        if not isinstance(value, ex.Num):
            raise SpecError(loc, f"argument '{p.name}' of {op.name}() must be a number", f"usage: {usage(op)}")
        return float(value.value)
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
        if not all(isinstance(i, ex.Num) and float(i.value).is_integer() and i.value >= 1 for i in items):
            raise SpecError(loc, f"argument '{p.name}' of {op.name}() must be a list of positive whole numbers", f"usage: {usage(op)}")
        return [int(i.value) for i in items]
    return value


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


def fail(loc: Loc, message: str, hint: str = "") -> SpecError:
    return SpecError(loc, message, hint)


# ------------------------------------------------------------------------------ shape helpers


def _last(shape: Shape):
    return shape[-1]


def _pool_shape(b: Bound, loc: Loc) -> Shape:
    shapes = b["x"]
    widths = {s[-1] for s in shapes}
    if len(widths) > 1:
        raise fail(loc, f"{b.get('_op', 'mean')}() pools tensors of different widths {sorted(widths, key=str)}",
                   "pool streams of one width, or project them to one width first")
    for s in shapes:
        if len(s) != 3:
            raise fail(loc, f"pooling expects token tensors [B, N, D], got a tensor of shape {fmt(s)}",
                       "pool encoder outputs like `backbone.audio`")
    return (shapes[0][0], shapes[0][-1])


def _avg_shape(b: Bound, loc: Loc) -> Shape:
    shapes = b["x"]
    if len({tuple(s) for s in shapes}) > 1:
        raise fail(loc, "avg() averages tensors of one shape, got " + ", ".join(fmt(s) for s in shapes),
                   "average outputs of the same head size")
    return shapes[0]


def _same_rows(b: Bound, loc: Loc, a: str, c: str, what: str) -> None:
    sa, sc = b[a], b[c]
    if sa[-1] != sc[-1]:
        raise fail(loc, f"{what} compares embeddings of different widths: {a} is {fmt(sa)}, {c} is {fmt(sc)}",
                   "project both to one width, e.g. `linear(x, 256)`")


def _nce_shape(b, loc):
    _same_rows(b, loc, "a", "b", "the contrastive loss")
    return ()


def _milnce_shape(b, loc):
    _same_rows(b, loc, "video", "text", "MIL-NCE")
    return ()


def _mse_shape(b, loc):
    if tuple(b["pred"])[-2:] != tuple(b["target"])[-2:]:
        raise fail(loc, f"masked_mse: prediction {fmt(b['pred'])} and target {fmt(b['target'])} differ",
                   "predict one row of patch values per patch: `linear(decoder.audio, VALUES_PER_PATCH)`")
    return ()


def _ce_shape(b, loc):
    if len(b["logits"]) != 2:
        raise fail(loc, f"ce() takes logits [B, classes], got {fmt(b['logits'])}", "pool tokens before the classifier")
    return ()


def _next_token_shape(b, loc):
    if len(b["logits"]) != 3:
        raise fail(loc, f"next_token() takes logits [B, L, vocab], got {fmt(b['logits'])}", "apply a linear head to the text tokens")
    return ()


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


def fmt(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# -------------------------------------------------------------------------------- the catalogue

T = Param


OPS: dict[str, OpDef] = {}


def _add(op: OpDef) -> None:
    OPS[op.name] = op


# tokenizers (used in `streams.*.tokenizer`); their shapes are worked out by the graph builder,
# which knows the input; parameter counts are in `avdsl.passes.cost`.
_add(OpDef("patch2d", "tokenizer", "Split an image or spectrogram into non-overlapping h x w patches, each linearly projected (ViT, AST); "
           "`channels=3` repeats a one-channel spectrogram to 3 channels first (MBT's reference, for RGB-ViT weights).",
           (T("h", "int"), T("w", "int"), T("channels", "int", 0))))
_add(OpDef("tubelet", "tokenizer", "Split a video into non-overlapping t x h x w tubelets, each linearly projected (ViViT, VATT, MBT).",
           (T("t", "int"), T("h", "int"), T("w", "int"))))
_add(OpDef("wave1d", "tokenizer", "Split a raw waveform into non-overlapping windows of k samples, each linearly projected (VATT's WaT).",
           (T("k", "int"),)))
_add(OpDef("embed", "tokenizer", "Look up token ids in an embedding table; with `dim`, embed at `dim` then project linearly to the width.",
           (T("vocab", "int"), T("dim", "int", 0), T("frozen", "bool", False))))
# positional encodings
_add(OpDef("learned", "position", "Learned positional embedding, one row per token position (or `size` buckets); "
           "with `norm=true` the sum of tokens and positions is LayerNorm-ed (VATT).",
           (T("size", "int", 0), T("norm", "bool", False))))
_add(OpDef("factorized", "position", "Learned factorised positions: one table per grid axis (time, height, width), summed and added; with `norm=true` the sum of tokens and positions is LayerNorm-ed (VATT).",
           (T("norm", "bool", False),)))
_add(OpDef("sincos2d", "position", "Fixed 2-D sine-cosine positions over the token grid (MAE); stored as a frozen parameter. "
           "The first half of the channels encodes the grid column, as MAE's table; `first=rows` encodes the row first.",
           (T("first", "name", "columns"),), choices={"first": ("columns", "rows")}))
_add(OpDef("none", "position", "No positional encoding.", ()))
# token dropping
_add(OpDef("droptoken", "drop", "In training only, keep a random `1 - rate` fraction of the tokens (VATT's DropToken).",
           (T("rate", "float"),)))
_add(OpDef("random_mask", "drop", "MAE masking: keep a random `1 - rate` fraction of tokens (always); records the mask for restore and losses.",
           (T("rate", "float"),)))
# outputs: pooling, projections, heads
_add(OpDef("mean", "pool", "Mean over tokens; several streams are pooled together as one sequence.", (T("x", "tensors"),), _pool_shape))
_add(OpDef("first", "pool", "The first token (a CLS or aggregation token).", (T("x", "tensors"),), _pool_shape))
_add(OpDef("avg", "pool", "Element-wise mean of tensors of one shape (e.g. averaging per-modality logits).", (T("x", "tensors"),), _avg_shape))
_add(OpDef("tokens", "pool", "The tokens of a stream, dropping `skip` leading ones (e.g. CLS).", (T("x", "tensor"), T("skip", "int", 0)),
           lambda b, loc: (b["x"][0], b["x"][1] - b["skip"], b["x"][2]) if isinstance(b["x"][1], int) else b["x"]))
_add(OpDef("linear", "project", "A linear layer to `out` features; `shared=NAME` reuses the weights of the linear output NAME "
           "(one classifier applied to several inputs, as MBT's per-modality CLS tokens).",
           (T("x", "tensor"), T("out", "int"), T("bias", "bool", True), T("shared", "name", "")),
           _linear_shape, _linear_params))
_add(OpDef("mlp", "project", "Linear layers of the given sizes with a norm and activation between them (e.g. MMV/VATT heads).",
           (T("x", "tensor"), T("sizes", "ints"), T("norm", "name", "bn"), T("act", "name", "relu"), T("bias", "bool", True),
            T("final_norm", "bool", True)), _mlp_shape, _mlp_params,
           {"norm": ("bn", "ln", "none"), "act": ("relu", "gelu", "none")}))
_add(OpDef("bn", "project", "BatchNorm over features.", (T("x", "tensor"),), lambda b, loc: b["x"], _norm_params))
_add(OpDef("layernorm", "project", "LayerNorm over features.", (T("x", "tensor"),), lambda b, loc: b["x"], _norm_params))
_add(OpDef("relu", "project", "ReLU.", (T("x", "tensor"),), lambda b, loc: b["x"]))
_add(OpDef("l2norm", "project", "Scale rows to unit length.", (T("x", "tensor"),), lambda b, loc: b["x"]))
_add(OpDef("patches", "target", "Patch rows of an input, in tokenizer order: the reconstruction target of an MAE.",
           (T("x", "tensor"), T("size", "ints")), _patches_shape))
# losses
_add(OpDef("nce", "loss", "Softmax InfoNCE between row-aligned embeddings (both directions by default).",
           (T("a", "tensor"), T("b", "tensor"), T("tau", "float", 0.07), T("both", "bool", True)), _nce_shape))
_add(OpDef("mil_nce", "loss", "MIL-NCE between video and (several) text embeddings (VATT, MIL-NCE).",
           (T("video", "tensor"), T("text", "tensor"), T("tau", "float", 0.07), T("normalize", "bool", False)), _milnce_shape))
_add(OpDef("focal_contrastive", "loss", "Sigmoid focal loss over the image-text similarity matrix (RO-ViT, MaMMUT).",
           (T("a", "tensor"), T("b", "tensor"), T("tau", "float", 0.07), T("gamma", "float", 2.0)), _nce_shape))
_add(OpDef("masked_mse", "loss", "Mean squared error on masked patches only, against per-patch normalised targets (MAE).",
           (T("pred", "tensor"), T("target", "tensor"), T("mask", "tensor"), T("norm_pix", "bool", True)), _mse_shape))
_add(OpDef("ce", "loss", "Softmax cross-entropy against class indices.", (T("logits", "tensor"), T("target", "tensor"),
                                                                          T("label_smoothing", "float", 0.0)), _ce_shape))
_add(OpDef("bce", "loss", "Sigmoid cross-entropy against 0/1 targets (multi-label); `reduction=sum_classes` sums over classes "
           "and averages over the batch (scenic, MBT) instead of averaging over both.",
           (T("logits", "tensor"), T("target", "tensor"), T("reduction", "name", "mean")),
           lambda b, loc: (), choices={"reduction": ("mean", "sum_classes")}))
_add(OpDef("next_token", "loss", "Next-token cross-entropy over a caption, ignoring padding.",
           (T("logits", "tensor"), T("tokens", "tensor")), _next_token_shape))


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
