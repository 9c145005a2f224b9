"""The typed spec: validated YAML data -> small dataclasses with every expression parsed.

This is the front end's last step. After it, nothing looks at raw YAML again: the graph builder works
from these dataclasses, and each carries the `Loc` its problems should be reported at.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import expr as ex
from .diagnostics import Loc, SpecError, did_you_mean
from .limits import MAX_ROUTING_RULES, MAX_SAMPLE_RATE, MAX_SIZE, MAX_STREAMS
from .loader import Doc
from .schema import validate

INPUT_KINDS = {"video": 5, "image": 4, "fbank": 3, "waveform": 2, "text": 2, "label": 1, "multilabel": 2}


@dataclass(frozen=True)
class InputDecl:
    name: str
    dims: tuple  # ints and symbol names, batch first
    kind: str
    classes: int | None
    sample_rate: int | None
    loc: Loc


@dataclass(frozen=True)
class StreamDecl:
    name: str
    source: str  # "input" | "from" | "latent"
    input: str | None = None
    from_ref: ex.Ref | None = None
    latent: int = 0
    tokenizer: ex.Call | None = None
    position: ex.Call | None = None
    type_embedding: bool = False
    cls: int = 0
    cls_position: bool = False  # True: CLS tokens are prepended before the positional embedding (ViT, MBT)
    drop: ex.Call | None = None
    mask: ex.Call | None = None
    restore: str | None = None
    share: str | None = None  # a `from:` stream whose projection and mask token this one uses
    width: int | None = None
    loc: Loc = Loc("<spec>")
    locs: dict[str, Loc] = field(default_factory=dict, compare=False, hash=False)  # key -> where it is written


RoutingEntry = tuple  # (ex.Rule | ex.Use, Loc): a routing line as written, its layers still symbolic


@dataclass(frozen=True)
class Sizes:
    width: int
    depth: int
    heads: int
    mlp_dim: int


@dataclass(frozen=True)
class EncoderDecl:
    name: str
    streams: tuple[str, ...]
    memory: dict[str, ex.Ref | ex.Call]  # local name -> the encoder output it reads (or a projection of one)
    sizes: Sizes
    weights: str  # shared | per_stream
    stream_sizes: dict[str, Sizes]  # per_stream overrides
    passes: dict[str, tuple[RoutingEntry, ...]]  # pass name ("" when the encoder has no passes) -> its routing
    norms: str
    final_norm: bool | str  # True: one per weight set; "shared": one for every stream; False: none
    bias: bool
    norm_eps: float
    activation: str
    dropout: float
    loc: Loc
    locs: dict[str, Loc] = field(default_factory=dict, compare=False, hash=False)
    pre_norm: bool = False  # a LayerNorm on the streams before the first layer (CLIP's `ln_pre`)
    memory_norm: bool = False  # each layer with cross-attention LayerNorms the memory tokens with its own norm
    cross_mlp: str = "shared"  # shared | with_cross | own: the feed-forward of a layer with cross-attention


@dataclass(frozen=True)
class NamedExpr:
    name: str
    expr: object
    loc: Loc


@dataclass(frozen=True)
class Spec:
    """A whole spec, typed. ``doc`` keeps the loaded YAML for locations and the resolved text."""

    name: str
    doc_text: str
    vars: dict[str, int | str]
    dims: dict[str, int]
    inputs: dict[str, InputDecl]
    streams: dict[str, StreamDecl]
    encoders: dict[str, EncoderDecl]
    rule_sets: dict[str, tuple[RoutingEntry, ...]]
    outputs: dict[str, NamedExpr]
    losses: dict[str, NamedExpr]
    train: dict  # training defaults, checked by the runtime's TrainConfig
    source: Doc

    def loc(self, *path) -> Loc:
        return self.source.loc(*path)


def _parse_call(doc: Doc, text, *path) -> ex.Call:
    node = ex.parse(text, "expr", doc.loc(*path))
    if isinstance(node, ex.Ref) and len(node.parts) == 1:
        node = ex.Call(node.parts[0], (), (), node.col)  # `learned` means `learned()`
    if not isinstance(node, ex.Call):
        raise SpecError(doc.loc(*path), f"expected an operator call here, e.g. `tubelet(2, 16, 16)`, got `{text}`",
                        "write the operator name followed by its arguments in parentheses")
    return node


def _input(doc: Doc, key: str, kind_text) -> InputDecl:
    """``frames[B, 3, 8, 224, 224]: video`` (the key declares the tensor, the value its kind)."""
    loc = doc.key_loc("inputs", key)
    decl = ex.parse(key, "decl", loc)
    kind_loc = doc.loc("inputs", key)
    if not isinstance(kind_text, str) or not kind_text.strip():
        raise SpecError(kind_loc, f"input '{decl.name}' does not say what kind of data it holds",
                        "write `NAME[dims]: KIND`, KIND one of " + ", ".join(INPUT_KINDS))
    call = _parse_call(doc, kind_text, "inputs", key)
    decl = ex.Decl(decl.name, decl.dims, call, decl.col, decl.dim_cols)
    kind = call.name
    if kind not in INPUT_KINDS:
        raise SpecError(kind_loc.shifted(call.col), f"unknown input kind '{kind}'", did_you_mean(kind, INPUT_KINDS, "a kind"))
    loc_kind = kind_loc
    _check_dims(decl.name, decl.dims, decl.dim_cols, loc)
    if decl.dims and not isinstance(decl.dims[0], str):
        raise SpecError(loc.shifted(decl.dim_cols[0]), f"the first dim of '{decl.name}' is the batch and must be a name like B",
                        f"write `{decl.name}[B, ...]`")
    want = INPUT_KINDS[kind]
    if len(decl.dims) != want:
        raise SpecError(loc.shifted(decl.col), f"a {kind} input has {want} dims (batch first), '{decl.name}' declares {len(decl.dims)}",
                        {"video": "e.g. `frames[B, 3, 8, 224, 224] : video`", "image": "e.g. `image[B, 3, 224, 224] : image`",
                         "fbank": "e.g. `fbank[B, 1024, 128] : fbank` (time frames x mel bins)",
                         "waveform": "e.g. `wave[B, 48000] : waveform(48000)`", "text": "e.g. `text[B, 16] : text`",
                         "label": "e.g. `label[B] : label(10)`", "multilabel": "e.g. `labels[B, 527] : multilabel(527)`"}[kind])
    args = [a.value for a in decl.kind.args if isinstance(a, ex.Num)]
    if len(decl.kind.args) > 1 or len(args) != len(decl.kind.args) or decl.kind.kwargs or \
            (args and (not float(args[0]).is_integer() or not 1 <= args[0] <= MAX_SIZE)):
        raise SpecError(loc_kind.shifted(decl.kind.col), f"`{kind}(...)` takes one whole number from 1 to {MAX_SIZE}",
                        {"label": "e.g. `label(10)` (classes)", "multilabel": "e.g. `multilabel(527)` (classes)",
                         "waveform": "e.g. `waveform(16000)` (the sample rate in Hz)"}.get(kind, f"write `{kind}` without arguments"))
    if args and kind not in ("label", "multilabel", "waveform"):
        raise SpecError(loc_kind.shifted(decl.kind.col), f"a {kind} input takes no arguments", f"write `{kind}`")
    classes = int(args[0]) if kind in ("label", "multilabel") and args else None
    if kind in ("label", "multilabel") and not classes:
        raise SpecError(loc_kind.shifted(decl.kind.col), f"a {kind} input needs its number of classes", f"e.g. `{kind}(10)`")
    rate = int(args[0]) if kind == "waveform" and args else (16000 if kind in ("waveform", "fbank") else None)
    if rate is not None and rate > MAX_SAMPLE_RATE:
        raise SpecError(loc_kind.shifted(decl.kind.col), f"a sample rate of {rate} Hz is more than {MAX_SAMPLE_RATE} Hz",
                        "e.g. `waveform(16000)`")
    return InputDecl(decl.name, decl.dims, kind, classes, rate, loc)


def _stream(doc: Doc, name: str, data: dict) -> StreamDecl:
    path = ("streams", name)
    locs = {k: doc.loc(*path, k) for k in data}
    source = "input" if "input" in data else "from" if "from" in data else "latent"
    kw = {}
    for key in ("tokenizer", "position", "drop", "mask"):
        if key in data:
            kw[key] = _parse_call(doc, data[key], *path, key)
    if "from" in data:
        ref = ex.parse(data["from"], "expr", doc.loc(*path, "from"))
        if not isinstance(ref, ex.Ref) or len(ref.parts) < 2:
            raise SpecError(doc.loc(*path, "from"), f"`from:` must name an encoder output like `encoder.stream`, got `{data['from']}`",
                            "e.g. `from: unimodal.audio` or `from: joint.av.audio`")
        kw["from_ref"] = ref
    if source == "input" and "tokenizer" not in kw:
        raise SpecError(doc.key_loc(*path), f"stream '{name}' reads input '{data['input']}' but has no tokenizer",
                        "add e.g. `tokenizer: patch2d(16, 16)`, `tubelet(2, 16, 16)`, `wave1d(128)` or `embed(259)`")
    return StreamDecl(name=name, source=source, input=data.get("input"), latent=int(data.get("latent", 0)),
                      type_embedding=bool(data.get("type_embedding", False)), cls=int(data.get("cls", 0)),
                      cls_position=bool(data.get("cls_position", False)),
                      restore=data.get("restore"), share=data.get("share"), width=data.get("width"),
                      loc=doc.key_loc(*path), locs=locs, **kw)


def _rules(doc: Doc, items: list, *path) -> tuple:
    if len(items) > MAX_ROUTING_RULES:
        raise SpecError(doc.loc(*path, MAX_ROUTING_RULES), f"{len(items)} routing rules here, more than the limit {MAX_ROUTING_RULES}",
                        "write fewer, broader rules (a rule may list several query and key streams)")
    out = []
    for i, text in enumerate(items):
        loc = doc.loc(*path, i)
        out.append((ex.parse(text, "rule", loc), loc))
    return tuple(out)


def _sizes(data: dict, base: Sizes | None = None) -> Sizes:
    width = int(data.get("width", base.width if base else 0))
    if "mlp_dim" in data:
        mlp = int(data["mlp_dim"])
    elif "mlp_ratio" in data or base is None:
        mlp = int(round(width * float(data.get("mlp_ratio", 4))))
    else:
        mlp = base.mlp_dim if width == base.width else int(round(width * base.mlp_dim / base.width))
    if mlp < 1:
        raise _FeedForward(mlp)
    return Sizes(width, int(data.get("depth", base.depth if base else 1)), int(data.get("heads", base.heads if base else 1)), mlp)


def _final_norm(value) -> bool | str:
    """``final_norm``: true/false, or ``shared`` (one LayerNorm for all streams, even with per-stream weights)."""
    return "shared" if value == "shared" else bool(value)


class _FeedForward(ValueError):
    """A feed-forward width below 1 (a tiny ``mlp_ratio``)."""


def _encoder(doc: Doc, name: str, data: dict) -> EncoderDecl:
    path = ("encoders", name)
    try:
        sizes = _sizes(data)
        stream_sizes = {s: _sizes(o, sizes) for s, o in (data.get("sizes") or {}).items()}
    except _FeedForward as err:
        raise SpecError(doc.loc(*path, "mlp_ratio"), f"encoder '{name}' would have a feed-forward width of {err.args[0]}",
                        "raise `mlp_ratio` (or set `mlp_dim`) so that width x mlp_ratio is at least 1") from None
    if "passes" in data and "routing" in data:
        raise SpecError(doc.key_loc(*path, "routing"), f"encoder '{name}' has both `routing:` and `passes:`",
                        "with passes, give each pass its own `routing:`")
    if "passes" in data:
        passes = {p: _rules(doc, v["routing"], *path, "passes", p, "routing") for p, v in data["passes"].items()}
    else:
        if "routing" not in data:
            raise SpecError(doc.key_loc(*path), f"encoder '{name}' has no routing rules",
                            "add `routing:` with one rule per stream, e.g. `- audio <- audio`")
        passes = {"": _rules(doc, data["routing"], *path, "routing")}
    memory = {}
    for local, text in (data.get("memory") or {}).items():
        ref = ex.parse(text, "expr", doc.loc(*path, "memory", local))
        if not (isinstance(ref, ex.Ref) and len(ref.parts) >= 2) and not isinstance(ref, ex.Call):
            raise SpecError(doc.loc(*path, "memory", local), "memory must name an encoder output like `vision.image`, "
                            "or project one, like `linear(vision.image, 512, bias=false)`",
                            "e.g. `memory: {image: vision.image}`")
        memory[local] = ref
    return EncoderDecl(name=name, streams=tuple(data["streams"]), memory=memory, sizes=sizes,
                       weights=data.get("weights", "shared"), stream_sizes=stream_sizes, passes=passes,
                       norms=data.get("norms", "shared"), final_norm=_final_norm(data.get("final_norm", True)),
                       bias=bool(data.get("bias", True)), norm_eps=float(data.get("norm_eps", 1e-6)),
                       activation=data.get("activation", "gelu"), dropout=float(data.get("dropout", 0.0)),
                       loc=doc.key_loc(*path), locs={k: doc.loc(*path, k) for k in data},
                       pre_norm=bool(data.get("pre_norm", False)), memory_norm=bool(data.get("memory_norm", False)),
                       cross_mlp=data.get("cross_mlp", "shared"))


def number_vars(values: dict) -> dict:
    """The vars that hold whole numbers (the others name rule sets)."""
    return {k: v for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}


def with_vars(node, sizes: dict):
    """``node`` with every bare name that is a numeric var replaced by its value, so a size is written
    once and changed with ``--set vars.NAME=VALUE``: ``embed(vocab)``, ``linear(x, vocab)``."""
    if isinstance(node, ex.Ref) and len(node.parts) == 1 and node.name in sizes:
        return ex.Num(sizes[node.name], node.col)
    if isinstance(node, ex.Call):
        return replace(node, args=tuple(with_vars(a, sizes) for a in node.args),
                       kwargs=tuple((k, with_vars(v, sizes)) for k, v in node.kwargs))
    if isinstance(node, ex.ListExpr):
        return replace(node, items=tuple(with_vars(i, sizes) for i in node.items))
    if isinstance(node, ex.BinOp):
        return replace(node, left=with_vars(node.left, sizes), right=with_vars(node.right, sizes))
    if isinstance(node, ex.Neg):
        return replace(node, operand=with_vars(node.operand, sizes))
    return node


def _input_with_vars(decl: InputDecl, sizes: dict, doc: Doc) -> InputDecl:
    """``caption[B, context]`` with ``vars: {context: 77}`` declares ``caption[B, 77]``."""
    dims = tuple(sizes.get(d, d) if isinstance(d, str) else d for d in decl.dims)
    for d, value in zip(decl.dims, dims):
        if d != value:
            _check_dims(decl.name, (value,), (0,), doc.loc("vars", d), f" (from vars.{d})")
    return replace(decl, dims=dims)


def _check_dims(name: str, dims, cols, loc: Loc, origin: str = "") -> None:
    for dim, col in zip(dims, cols):
        if isinstance(dim, int) and dim < 1:
            raise SpecError(loc.shifted(col), f"dimension {dim}{origin} of '{name}' must be at least 1", "sizes are positive")
        if isinstance(dim, int) and dim > MAX_SIZE:
            raise SpecError(loc.shifted(col), f"dimension {dim}{origin} of '{name}' is absurdly large (more than {MAX_SIZE})",
                            "check the number")


def _stream_with_vars(s: StreamDecl, sizes: dict) -> StreamDecl:
    calls = {k: with_vars(getattr(s, k), sizes) for k in ("tokenizer", "position", "drop", "mask") if getattr(s, k) is not None}
    return replace(s, **calls)


def from_doc(doc: Doc) -> Spec:
    """Validate ``doc`` against the schema and parse every expression in it."""
    validate(doc)
    d = doc.data
    sizes = number_vars(d.get("vars") or {})
    for name, value in sizes.items():
        if abs(value) > MAX_SIZE:
            raise SpecError(doc.loc("vars", name), f"var '{name}' is {value}, more than the limit {MAX_SIZE}",
                            "vars hold sizes and layer numbers; check the number")
    name = d.get("name", "model")
    if not name.isprintable() or len(name) > 200:
        raise SpecError(doc.loc("name"), f"the name {name[:200]!r} holds a control character or is too long",
                        "a name is one short line of text, e.g. `name: zorro-small`")
    if len(d["streams"]) > MAX_STREAMS:
        raise SpecError(doc.key_loc("streams"), f"the spec declares {len(d['streams'])} streams, more than the limit {MAX_STREAMS}",
                        "models have a few token streams; group tokens into fewer streams")
    inputs = {}
    for key, kind in d["inputs"].items():
        decl = _input(doc, str(key), kind)
        if decl.name in inputs:
            raise SpecError(decl.loc, f"input '{decl.name}' is declared twice", "give each input its own name", code="S101")
        inputs[decl.name] = _input_with_vars(decl, sizes, doc)
    streams = {n: _stream_with_vars(_stream(doc, n, s), sizes) for n, s in d["streams"].items()}
    encoders = {n: _encoder(doc, n, e) for n, e in d["encoders"].items()}
    encoders = {n: replace(e, memory={k: with_vars(v, sizes) for k, v in e.memory.items()}) for n, e in encoders.items()}
    rule_sets = {n: _rules(doc, r, "rule_sets", n) for n, r in (d.get("rule_sets") or {}).items()}
    outputs = {n: NamedExpr(n, with_vars(ex.parse(t, "expr", doc.loc("outputs", n)), sizes), doc.loc("outputs", n))
               for n, t in (d.get("outputs") or {}).items()}
    losses = {n: NamedExpr(n, with_vars(ex.parse(t, "expr", doc.loc("losses", n)), sizes), doc.loc("losses", n))
              for n, t in (d.get("losses") or {}).items()}
    return Spec(name=d.get("name", "model"), doc_text=d.get("doc", ""), vars=dict(d.get("vars") or {}),
                dims=dict(d.get("dims") or {}), inputs=inputs, streams=streams, encoders=encoders,
                rule_sets=rule_sets, outputs=outputs, losses=losses, train=dict(d.get("train") or {}), source=doc)
