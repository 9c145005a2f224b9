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
                  PositionNode, RestoreNode, TensorInfo, TokenizeNode, encoder_output, visit)
from ..ops import divisors, fmt
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


@dataclass(frozen=True)
class _Pass:
    """What every shape rule may read: the graph (whose ``tensors`` it fills) and the stream widths."""

    graph: Graph
    widths: dict

    def info(self, tensor: str) -> TensorInfo:
        return self.graph.tensors[tensor]


def _input(node: InputNode, p: _Pass) -> TensorInfo:
    return TensorInfo(tuple(node.decl.dims), "long" if node.decl.kind in ("text", "label") else "float")


def _tokenize(node: TokenizeNode, p: _Pass) -> TensorInfo:
    op, x = ops.OPS[node.op], p.info(node.inputs[0])
    decl = p.graph.spec.inputs[node.inputs[0]]
    b = ops.bound_for(op, {**node.args, "x": x.shape}, decls={"x": decl}, kind=decl.kind, width=p.widths[node.stream],
                      stream=node.stream)
    grid = op.shape(b, node.loc)
    count = 1
    for g in grid:
        count = count * g if isinstance(g, int) and isinstance(count, int) else "N"
    return TensorInfo((x.shape[0], count, p.widths[node.stream]), grid=grid)


def _position(node: PositionNode, p: _Pass) -> TensorInfo:
    op, x = ops.OPS[node.op], p.info(node.inputs[0])
    op.shape(ops.bound_for(op, {**node.args, "x": x.shape}, grid=x.grid, width=p.widths[node.stream], stream=node.stream), node.loc)
    return x


def _latent(node: LatentNode, p: _Pass) -> TensorInfo:
    w = p.widths[node.stream]
    if not node.prepend:
        return TensorInfo((_batch(p.graph.spec), node.count, w))
    x = p.info(node.inputs[0])
    return TensorInfo((x.shape[0], x.shape[1] + node.count if isinstance(x.shape[1], int) else x.shape[1], w))


def _drop(node: DropNode, p: _Pass) -> TensorInfo:
    op, x = ops.OPS[node.op], p.info(node.inputs[0])
    if op.shape:  # a drop that keeps every token (modality dropout)
        return TensorInfo(op.shape(ops.bound_for(op, {"rate": node.rate, "x": x.shape}), node.loc), grid=x.grid)
    n = x.shape[1]
    keep = int(n * (1 - node.rate)) if isinstance(n, int) else n
    if isinstance(keep, int) and keep < 1:
        raise SpecError(node.loc, f"{node.op}({node.rate}) would keep no token of the stream's {n}", "lower the rate")
    if op.writes_mask:
        p.graph.tensors[node.outputs[1]] = TensorInfo((x.shape[0], n), "float", grid=x.grid)
        p.graph.tensors[node.outputs[2]] = TensorInfo((x.shape[0], n), "long", grid=x.grid)
    return TensorInfo((x.shape[0], keep, x.shape[2]), train_only_shape=x.shape if op.train_only else None)


def _restore(node: RestoreNode, p: _Pass) -> TensorInfo:
    x, mask = p.info(node.inputs[0]), p.info(node.inputs[1])
    kept = p.info(f"{node.masked}/kept").shape[1]
    if x.shape[1] != kept:
        raise SpecError(node.loc, f"restore: the stream has {x.shape[1]} tokens but '{node.masked}' kept {kept}",
                        "restore the tokens that came out of the masked stream, without extra tokens")
    return TensorInfo((x.shape[0], mask.shape[1], x.shape[2]), grid=mask.grid)


def _from(node: FromNode, p: _Pass) -> TensorInfo:
    x = p.info(node.inputs[0])
    return TensorInfo((x.shape[0], x.shape[1], p.widths[node.stream]), grid=x.grid)


def _encoder(node: EncoderNode, p: _Pass) -> None:
    _encoder_shapes(node, p.graph, p.widths)


def _loss(node: LossNode, p: _Pass) -> TensorInfo:
    return TensorInfo(())


RULES = {"input": _input, "tokenize": _tokenize, "position": _position, "typeembed": lambda node, p: p.info(node.inputs[0]),
         "latent": _latent, "drop": _drop, "restore": _restore, "from": _from, "encoder": _encoder,
         "call": lambda node, p: _call_shape(node, p.graph), "loss": _loss}


def infer_shapes(graph: Graph) -> Graph:
    """Fill ``graph.tensors`` with a `TensorInfo` per tensor; raise `SpecError` at the first mismatch."""
    p = _Pass(graph, stream_widths(graph.spec, graph))
    for node in graph.nodes():
        info = visit(RULES, node, p)
        if info is not None:
            graph.tensors[node.outputs[0]] = info
    _check_shared_calls(graph)
    _check_shares(graph, p.widths)
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


def _check_shared_calls(graph: Graph) -> None:
    """A call with a `share` argument (``linear(x, out, shared=NAME)``) runs the module of output NAME:
    NAME must be an output of the same operator with its own weights and the same input width and arguments."""
    def owns(node, op) -> bool:
        return isinstance(node, CallNode) and node.op == op.name and not node.args.get(op.share)

    def signature(node) -> tuple:
        widths = (graph.tensors[node.inputs[0]].shape[-1], graph.tensors[node.outputs[0]].shape[-1])
        return widths + tuple(v for k, v in node.args.items() if k != ops.OPS[node.op].share)

    for node in graph.of_type(CallNode):
        op = ops.OPS[node.op]
        name = node.args.get(op.share) if op.share else None
        if not name:
            continue
        target = graph.outputs.get(name)
        owner = graph.node(graph.producer[target]) if target in graph.producer else None
        if not owns(owner, op):
            candidates = [n for n, t in graph.outputs.items() if owns(graph.node(graph.producer[t]), op)]
            raise SpecError(node.loc, f"`{op.share}={name}` must name an output that is a {op.name} layer with its own weights",
                            (f"{op.name} outputs here: " + ", ".join(candidates)) if candidates
                            else f"define e.g. `{name}: {ops.usage(op)}` first")
        mine, theirs = signature(node), signature(owner)
        if mine != theirs:
            raise SpecError(node.loc, f"`{op.share}={name}`: this {op.name} maps {mine[0]} -> {mine[1]} ({ops.args_text(op, node.args)}), "
                            f"'{name}' maps {theirs[0]} -> {theirs[1]} ({ops.args_text(op, owner.args)})",
                            "a shared layer needs the same sizes")


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
                            f"in encoder '{enc.name}'", f"use heads that divide {ws.sizes.width}, e.g. {divisors(ws.sizes.width, ws.sizes.heads)}",
                            code="H301")
    stream_in = dict(zip(node.streams + node.memory, node.inputs))
    for local in node.memory:
        shape = t[stream_in[local]].shape
        if len(shape) != 3:
            raise SpecError(graph.spec.loc("encoders", enc.name, "memory", local), f"memory '{local}' of encoder '{enc.name}' is {fmt(shape)}, not tokens [B, N, D]",
                            "cross-attention reads tokens: name an encoder output, or project one with `linear(...)` (not a pooled vector)")
    crossing = any(a.cross for plan in node.plans.values() for layer in plan.layers for a in layer.attends)
    for key, default in (("memory_norm", False), ("cross_mlp", "shared")):
        if getattr(enc, key) != default and not crossing:
            raise SpecError(enc.locs.get(key, enc.loc), f"`{key}: {str(getattr(enc, key)).lower()}` shapes cross-attention, but no routing "
                            f"rule of encoder '{enc.name}' is `(cross)`", f"add a rule like `text <- memory (cross)`, or remove `{key}`")
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
            key = encoder_output(enc.name, pname, s)
            t[key] = t[stream_in[s]]


def _written(graph: Graph, tensor: str) -> str:
    """A tensor as the spec wrote it: an output's or input's name, an encoder output `enc.stream`, or
    the operator of an inline call."""
    if tensor.startswith("out.") and tensor[4:] in graph.outputs:
        return tensor[4:]
    node = graph.node(graph.producer[tensor]) if tensor in graph.producer else None
    if isinstance(node, CallNode):
        return f"{node.op}({', '.join(_written(graph, t) for t in node.inputs)})"
    return tensor


def call_bound(node: CallNode, graph: Graph) -> ops.Bound:
    """A call's arguments for its operator's rules: tensor parameters bound to their shapes (a list for
    variadic ones) and, when they read a spec input directly, to its declaration in ``decls``."""
    op = ops.OPS[node.op]
    b = ops.bound_for(op, node.args)
    variadic = {p.name for p in op.params if p.kind == "tensors"}
    for param, tensor in zip(node.tensor_params, node.inputs):
        shape = graph.tensors[tensor].shape
        if param in variadic:
            b.setdefault(param, []).append(shape)
        else:
            b[param] = shape
            b.decls[param] = graph.spec.inputs.get(tensor)
        b.written.setdefault(param, _written(graph, tensor))
    return b


def _check_input_kinds(node: CallNode, graph: Graph) -> None:
    """Class indices, label sets and token ids are targets, not features: an input of such a kind may
    only be the target of its loss; a target or patches() argument must be an input of the right kind."""
    inputs = graph.spec.inputs
    for param, tensor in zip(node.tensor_params, node.inputs):
        allowed = ops.INPUT_ARGUMENTS.get((node.op, param))
        decl = inputs.get(tensor)
        if allowed is not None and (decl is None or decl.kind not in allowed):
            what = f"input '{decl.name}' is {decl.kind}" if decl is not None else f"'{tensor}' is not an input"
            raise SpecError(node.loc, f"{node.op}(): argument '{param}' must be an input of kind {' or '.join(allowed)}; {what}",
                            ops.INPUT_EXAMPLES[node.op])
        if allowed is None and decl is not None and decl.kind not in ops.SIGNAL_KINDS:
            target = next((p for p, t in zip(node.tensor_params, node.inputs) if p != param and decl.kind in
                           ops.INPUT_ARGUMENTS.get((node.op, p), ())), None)
            if target is not None:  # `ce(label, logits)`: the arguments are swapped
                other = _written(graph, node.inputs[node.tensor_params.index(target)])
                raise SpecError(node.loc, f"{node.op}() takes the {param} first and the {target} second; "
                                f"'{decl.name}' is the {decl.kind} input", f"write `{node.op}({other}, {decl.name})`")
            raise SpecError(node.loc, f"{node.op}() cannot take input '{decl.name}': it is {decl.kind} (indices, not features)",
                            "use it as the target of a loss, e.g. `ce(logits, label)`; tokenize text with a stream")


def _call_shape(node: CallNode, graph: Graph) -> TensorInfo:
    _check_input_kinds(node, graph)
    return TensorInfo(tuple(ops.OPS[node.op].shape(call_bound(node, graph), node.loc)))
