"""Shape inference: every tensor's shape, before any weight exists.

A pure pass over the graph in topological order. Batch (and any other named dim) stays symbolic;
concrete sizes are checked wherever they meet (patch sizes against inputs, widths against encoders,
loss arguments against each other) and a mismatch is reported at the spec location that caused it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ..diagnostics import SpecError
from ..ir import (CallNode, DropNode, EncoderNode, FromNode, Graph, InputNode, LatentNode, LossNode,
                  PositionNode, RestoreNode, TensorInfo, TokenizeNode, TypeEmbedNode)
from ..ops import fmt
from ..spec import Sizes, Spec


@dataclass(frozen=True)
class WeightSet:
    """One set of transformer weights inside an encoder: ``shared`` or a stream's own."""

    name: str
    sizes: Sizes


def weight_sets(node: EncoderNode) -> dict[str, WeightSet]:
    """The weight sets an encoder needs: ``shared``, or one per stream that some rule uses."""
    enc = node.decl
    if enc.weights == "shared":
        return {"shared": WeightSet("shared", enc.sizes)}
    used: dict[str, None] = {}
    for plan in node.plans.values():
        for layer in plan.layers:
            for a in layer.attends:
                used.setdefault(a.weights)
    return {w: WeightSet(w, enc.stream_sizes.get(w, enc.sizes)) for w in used}


def stream_widths(spec: Spec, graph: Graph) -> dict[str, int]:
    """Each stream's width: declared, or the width of the encoder weights that consume it."""
    widths: dict[str, tuple[int, object]] = {}
    for node in graph.of_type(EncoderNode):
        enc = node.decl
        for s in enc.streams:
            size = enc.stream_sizes.get(s, enc.sizes) if enc.weights == "per_stream" else enc.sizes
            if s in widths and widths[s][0] != size.width:
                raise SpecError(enc.loc, f"stream '{s}' is {widths[s][0]} wide for one encoder and {size.width} for encoder '{enc.name}'",
                                "a stream has one width; add a `from:` stream to change width between encoders")
            widths[s] = (size.width, enc)
    for node in graph.of_type(EncoderNode):
        if node.decl.weights == "per_stream":
            _widths_from_via(node, widths)
    out = {}
    for name, s in spec.streams.items():
        if s.width is not None:
            if name in widths and widths[name][0] != s.width:
                raise SpecError(s.locs.get("width", s.loc), f"stream '{name}' declares width {s.width}, but encoder "
                                f"'{widths[name][1].name}' runs it at width {widths[name][0]}", "remove `width:` or make them agree")
            out[name] = s.width
        elif name in widths:
            out[name] = widths[name][0]
        else:
            raise SpecError(s.loc, f"stream '{name}' is not used by any encoder, so its width is unknown",
                            "add it to an encoder's `streams:`, or give it `width:`")
    return out


def _widths_from_via(node: EncoderNode, widths: dict) -> None:
    """With per-stream weights, a stream that is only ever computed with another stream's weights
    (``text <- text via video``: VATT's modality-agnostic backbone) takes that weight set's width."""
    enc = node.decl
    for s in enc.streams:
        used = {a.weights for plan in node.plans.values() for layer in plan.layers for a in layer.attends if a.query == s}
        if used and s not in used:
            sizes = {enc.stream_sizes.get(w, enc.sizes).width for w in used}
            if len(sizes) == 1:
                widths[s] = (sizes.pop(), enc)


def _tokenize(node: TokenizeNode, x: TensorInfo, kind: str, width: int, loc) -> TensorInfo:
    a, shape = node.args, x.shape
    batch = shape[0]

    def divide(dims, sizes, names):
        grid = []
        for dim, size, name in zip(dims, sizes, names):
            if isinstance(dim, int) and dim % size:
                raise SpecError(loc, f"{node.op} size {size} does not divide the input's {name} {dim} (input {fmt(shape)})",
                                f"choose a size that divides {dim}, e.g. {', '.join(str(d) for d in _divisors(dim, size))}", code="H302")
            grid.append(dim // size if isinstance(dim, int) else dim)
        return tuple(grid)

    if node.op == "patch2d":
        if kind not in ("image", "fbank"):
            raise SpecError(loc, f"patch2d() tokenizes an image or fbank input; '{node.inputs[0]}' is {kind} {fmt(shape)}",
                            "use tubelet(t, h, w) for video, wave1d(k) for waveforms, embed(vocab) for text")
        grid = divide(shape[-2:], (a["h"], a["w"]), ("height" if kind == "image" else "time frames", "width" if kind == "image" else "mel bins"))
    elif node.op == "tubelet":
        if kind != "video":
            raise SpecError(loc, f"tubelet() tokenizes a video input [B, C, T, H, W]; '{node.inputs[0]}' is {kind} {fmt(shape)}",
                            "use patch2d(h, w) for images and spectrograms")
        grid = divide(shape[-3:], (a["t"], a["h"], a["w"]), ("frames", "height", "width"))
    elif node.op == "wave1d":
        if kind != "waveform":
            raise SpecError(loc, f"wave1d() tokenizes a waveform input [B, S]; '{node.inputs[0]}' is {kind} {fmt(shape)}",
                            "use patch2d(h, w) for spectrograms")
        grid = divide(shape[-1:], (a["k"],), ("samples",))
    else:  # embed
        if kind != "text":
            raise SpecError(loc, f"embed() looks up text token ids [B, L]; '{node.inputs[0]}' is {kind} {fmt(shape)}",
                            "use a patch tokenizer for signals")
        grid = (shape[1],)
    count = 1
    for g in grid:
        count = count * g if isinstance(g, int) and isinstance(count, int) else "N"
    return TensorInfo((batch, count, width), grid=grid)


def _divisors(dim: int, near: int) -> list[int]:
    ds = [d for d in range(1, dim + 1) if dim % d == 0]
    return sorted(ds, key=lambda d: abs(d - near))[:3]


def infer_shapes(graph: Graph) -> Graph:
    """Fill ``graph.tensors`` with a `TensorInfo` per tensor; raise `SpecError` at the first mismatch."""
    spec = graph.spec
    widths = stream_widths(spec, graph)
    t = graph.tensors
    for node in graph.nodes():
        loc = node.loc
        if isinstance(node, InputNode):
            dtype = "long" if node.decl.kind in ("text", "label") else "float"
            t[node.outputs[0]] = TensorInfo(tuple(node.decl.dims), dtype)
        elif isinstance(node, TokenizeNode):
            kind = spec.inputs[node.inputs[0]].kind
            t[node.outputs[0]] = _tokenize(node, t[node.inputs[0]], kind, widths[node.stream], loc)
        elif isinstance(node, PositionNode):
            x = t[node.inputs[0]]
            n = x.shape[1]
            if node.op == "learned" and node.args["size"] and isinstance(n, int) and node.args["size"] < n:
                raise SpecError(loc, f"learned({node.args['size']}) has fewer positions than the stream's {n} tokens",
                                f"use learned() (one per token) or learned({n})")
            if node.op in ("factorized", "sincos2d") and x.grid is None:
                raise SpecError(loc, f"{node.op}() needs a token grid; stream '{node.stream}' has none (latent or continued tokens)",
                                "use learned() here")
            if node.op == "sincos2d" and len(x.grid) != 2:
                raise SpecError(loc, f"sincos2d() needs a 2-D token grid; stream '{node.stream}' has a {len(x.grid)}-D grid {x.grid}",
                                "use factorized() or learned() for video tubelets")
            if node.op == "sincos2d" and widths[node.stream] % 4:
                raise SpecError(loc, f"sincos2d() needs a width divisible by 4, got {widths[node.stream]}", "choose a width divisible by 4")
            t[node.outputs[0]] = x
        elif isinstance(node, TypeEmbedNode):
            t[node.outputs[0]] = t[node.inputs[0]]
        elif isinstance(node, LatentNode):
            w = widths[node.stream]
            if node.prepend:
                x = t[node.inputs[0]]
                n = x.shape[1] + node.count if isinstance(x.shape[1], int) else x.shape[1]
                t[node.outputs[0]] = TensorInfo((x.shape[0], n, w))
            else:
                t[node.outputs[0]] = TensorInfo((_batch(spec), node.count, w))
        elif isinstance(node, DropNode):
            x = t[node.inputs[0]]
            n = x.shape[1]
            keep = int(n * (1 - node.rate)) if isinstance(n, int) else n
            if isinstance(keep, int) and keep < 1:
                raise SpecError(loc, f"{node.op}({node.rate}) would keep no token of the stream's {n}", "lower the rate")
            t[node.outputs[0]] = TensorInfo((x.shape[0], keep, x.shape[2]), train_only_shape=x.shape if node.op == "droptoken" else None)
            if node.op == "random_mask":
                t[node.outputs[1]] = TensorInfo((x.shape[0], n), "float", grid=x.grid)
                t[node.outputs[2]] = TensorInfo((x.shape[0], n), "long", grid=x.grid)
        elif isinstance(node, RestoreNode):
            x, mask = t[node.inputs[0]], t[node.inputs[1]]
            kept = graph.tensors[f"{node.masked}/kept"].shape[1]
            if x.shape[1] != kept:
                raise SpecError(loc, f"restore: the stream has {x.shape[1]} tokens but '{node.masked}' kept {kept}",
                                "restore the tokens that came out of the masked stream, without extra tokens")
            t[node.outputs[0]] = TensorInfo((x.shape[0], mask.shape[1], x.shape[2]), grid=mask.grid)
        elif isinstance(node, FromNode):
            x = t[node.inputs[0]]
            t[node.outputs[0]] = TensorInfo((x.shape[0], x.shape[1], widths[node.stream]), grid=x.grid)
        elif isinstance(node, EncoderNode):
            _encoder_shapes(node, graph, widths)
        elif isinstance(node, CallNode):
            t[node.outputs[0]] = _call_shape(node, graph)
        elif isinstance(node, LossNode):
            t[node.outputs[0]] = TensorInfo(())
    _check_shared_linears(graph)
    _check_shares(graph, widths)
    return graph


def _check_shares(graph: Graph, widths: dict) -> None:
    """A `from:` stream with ``share:`` runs the other stream's projection, so both map the same widths."""
    t = graph.tensors
    for node in graph.of_type(FromNode):
        if node.share is None:
            continue
        owner = graph.node(f"{node.share}/from")
        mine = (t[node.inputs[0]].shape[-1], widths[node.stream])
        theirs = (t[owner.inputs[0]].shape[-1], widths[owner.stream])
        if mine != theirs:
            raise SpecError(node.loc, f"stream '{node.stream}' shares the projection of '{node.share}' but maps width "
                            f"{mine[0]} -> {mine[1]}, and '{node.share}' maps {theirs[0]} -> {theirs[1]}",
                            "streams that share a projection need the same widths on both sides")


def _check_shared_linears(graph: Graph) -> None:
    """``linear(x, out, shared=NAME)`` reuses the weights of output NAME: NAME must be a plain linear
    output (not itself shared) with the same input width, output size and bias."""
    def own_linear(node) -> bool:
        return isinstance(node, CallNode) and node.op == "linear" and not node.args.get("shared")

    for node in graph.of_type(CallNode):
        name = node.args.get("shared") if node.op == "linear" else None
        if not name:
            continue
        target = graph.outputs.get(name)
        owner = graph.node(graph.producer[target]) if target in graph.producer else None
        if not own_linear(owner):
            linears = [n for n, t in graph.outputs.items() if own_linear(graph.node(graph.producer[t]))]
            raise SpecError(node.loc, f"`shared={name}` must name an output that is a linear layer with its own weights",
                            ("linear outputs here: " + ", ".join(linears)) if linears else "define e.g. `logits_a: linear(x, 10)` first")
        mine = (graph.tensors[node.inputs[0]].shape[-1], node.args["out"], node.args["bias"])
        theirs = (graph.tensors[owner.inputs[0]].shape[-1], owner.args["out"], owner.args["bias"])
        if mine != theirs:
            raise SpecError(node.loc, f"`shared={name}`: this linear maps {mine[0]} -> {mine[1]} (bias {mine[2]}), "
                            f"'{name}' maps {theirs[0]} -> {theirs[1]} (bias {theirs[2]})", "a shared layer needs the same sizes")


def _batch(spec: Spec):

    for decl in spec.inputs.values():
        return decl.dims[0]
    return "B"


def _encoder_shapes(node: EncoderNode, graph: Graph, widths: dict) -> None:
    enc, t = node.decl, graph.tensors
    sets = weight_sets(node)
    if enc.final_norm == "shared" and len({ws.sizes.width for ws in sets.values()}) > 1:
        raise SpecError(enc.locs.get("final_norm", enc.loc), f"`final_norm: shared` needs one width; encoder '{enc.name}' has weight sets "
                        + ", ".join(f"{w} ({ws.sizes.width})" for w, ws in sets.items()), "use `final_norm: true` (one per weight set)")
    for ws in sets.values():
        if ws.sizes.width % ws.sizes.heads:
            raise SpecError(enc.locs.get("heads", enc.loc), f"width {ws.sizes.width} is not divisible by {ws.sizes.heads} heads "
                            f"in encoder '{enc.name}'", f"use heads that divide {ws.sizes.width}, e.g. {_divisors(ws.sizes.width, ws.sizes.heads)}",
                            code="H301")
    stream_in = dict(zip(node.streams + node.memory, node.inputs))
    for pname, plan in node.plans.items():
        for layer in plan.layers:
            for a in layer.attends:
                w = sets[a.weights].sizes.width
                if a.cross:
                    continue
                for k in a.keys + (a.query,):
                    width = t[stream_in[k]].shape[-1]
                    if width != w:
                        raise SpecError(a.loc, f"stream '{k}' is {width} wide but is read with the {w}-wide weights of '{a.weights}'",
                                        "streams attended with one set of weights must share its width")
                if a.causal and a.keys != (a.query,):
                    # handled by a boolean mask in the runtime; nothing to check here
                    pass
        for s in plan.streams():
            key = f"{enc.name}.{pname}.{s}" if pname else f"{enc.name}.{s}"
            t[key] = t[stream_in[s]]


# where a raw input of a non-signal kind may be passed: (operator, argument) -> the kinds allowed there
INPUT_ARGUMENTS = {("ce", "target"): ("label",), ("bce", "target"): ("multilabel",), ("next_token", "tokens"): ("text",),
                   ("patches", "x"): ("fbank", "image", "video")}
SIGNAL_KINDS = ("fbank", "image", "video", "waveform")


def _check_input_kinds(node: CallNode, graph: Graph) -> None:
    """Class indices, label sets and token ids are targets, not features: an input of such a kind may
    only be the target of its loss; a target or patches() argument must be an input of the right kind."""
    inputs = graph.spec.inputs
    for param, tensor in zip(node.tensor_params, node.inputs):
        allowed = INPUT_ARGUMENTS.get((node.op, param))
        decl = inputs.get(tensor)
        if allowed is not None and (decl is None or decl.kind not in allowed):
            what = f"input '{decl.name}' is {decl.kind}" if decl is not None else f"'{tensor}' is not an input"
            raise SpecError(node.loc, f"{node.op}(): argument '{param}' must be an input of kind {' or '.join(allowed)}; {what}",
                            {"ce": "e.g. `ce(logits, label)` with `label[B]: label(10)`",
                             "bce": "e.g. `bce(logits, labels)` with `labels[B, 527]: multilabel(527)`",
                             "next_token": "e.g. `next_token(logits, caption)` with `caption[B, 16]: text`",
                             "patches": "e.g. `patches(fbank, [16, 16])`"}[node.op])
        if allowed is None and decl is not None and decl.kind not in SIGNAL_KINDS:
            raise SpecError(node.loc, f"{node.op}() cannot take input '{decl.name}': it is {decl.kind} (indices, not features)",
                            "use it as the target of a loss, e.g. `ce(logits, label)`; tokenize text with a stream")


def _call_shape(node: CallNode, graph: Graph) -> TensorInfo:
    op = ops.OPS[node.op]
    bound = ops.Bound(node.args)
    bound.cols = {}
    shapes = [graph.tensors[i].shape for i in node.inputs]
    for param, shape in zip(node.tensor_params, shapes):
        if any(p.name == param and p.kind == "tensors" for p in op.params):
            bound.setdefault(param, []).append(shape)
        else:
            bound[param] = shape
    bound["_op"] = op.name
    loc = node.loc
    _check_input_kinds(node, graph)
    # checks that need to know which input is which
    if op.name in ("ce", "bce"):
        logits, target = bound["logits"], bound["target"]
        decl = graph.spec.inputs.get(node.inputs[1])
        if decl is not None and decl.classes and logits[-1] != decl.classes:
            raise SpecError(loc, f"{op.name}(): the logits have {logits[-1]} classes but '{decl.name}' has {decl.classes}",
                            f"make the classifier `linear(..., {decl.classes})`")
        if op.name == "ce" and decl is not None and decl.kind != "label":
            raise SpecError(loc, f"ce() needs class indices; '{decl.name}' is {decl.kind}", "use bce() for multilabel targets")
        if op.name == "bce" and decl is not None and decl.kind != "multilabel":
            raise SpecError(loc, f"bce() needs 0/1 targets; '{decl.name}' is {decl.kind}", "use ce() for class indices")
    if op.name == "next_token":
        decl = graph.spec.inputs.get(node.inputs[1])
        if decl is None or decl.kind != "text":
            raise SpecError(loc, "next_token() predicts the tokens of a text input", "pass the text input, e.g. `next_token(logits, caption)`")
        logits = bound["logits"]
        if len(logits) == 3 and isinstance(logits[1], int) and isinstance(decl.dims[1], int) and logits[1] != decl.dims[1]:
            raise SpecError(loc, f"next_token(): the logits have {logits[1]} positions but '{decl.name}' has {decl.dims[1]} tokens",
                            "compute the logits from the text stream's tokens, e.g. `linear(decoder.text, VOCAB)`")
    if op.name == "masked_mse":
        mask = bound["mask"]
        if tuple(mask) != tuple(bound["pred"][:2]):
            raise SpecError(loc, f"masked_mse: the mask {fmt(mask)} does not match the prediction {fmt(bound['pred'])}",
                            "pass the mask of the stream the prediction reconstructs, e.g. `audio.mask`")
    if op.name == "patches":
        decl = graph.spec.inputs.get(node.inputs[0])
        if decl is None:
            raise SpecError(loc, "patches() cuts an input into patch rows", "e.g. `patches(fbank, [16, 16])`")
    shape = op.shape(bound, loc) if op.shape else bound.get("x", ())
    return TensorInfo(tuple(shape))
