"""Spec -> graph: one node per operation, names resolved, routing planned.

A pure function of the typed `Spec`. Every name in the spec (inputs, streams, encoder outputs,
outputs, losses) is resolved here, so an unknown or misspelled one is reported once, at its column,
with the closest names as a hint.
"""
from __future__ import annotations

import math

import networkx as nx

from . import expr as ex
from . import ops
from .diagnostics import Loc, SpecError, did_you_mean
from .ir import (CallNode, DropNode, EncoderNode, FromNode, Graph, InputNode, LatentNode, LossNode,
                 PositionNode, RestoreNode, TokenizeNode, TypeEmbedNode, encoder_output)
from .routing import plan_pass
from .limits import MAX_LOSS_WEIGHT
from .spec import Spec


class _Names:
    """What a reference in an expression can name, mapped to tensor names."""

    def __init__(self) -> None:
        self.table: dict[str, str] = {}
        self.kinds: dict[str, str] = {}

    def add(self, name: str, tensor: str, kind: str) -> None:
        self.table[name] = tensor
        self.kinds[name] = kind

    def resolve(self, ref: ex.Ref, loc: Loc, wanted: str = "tensor") -> str:
        if ref.name in self.table:
            return self.table[ref.name]
        hint = did_you_mean(ref.name, self.table, "")
        if not hint.startswith("did you mean") and len(ref.parts) > 1 and ref.parts[0] in self.table:
            hint = f"'{ref.parts[0]}' is a {self.kinds[ref.parts[0]]}; " + did_you_mean(
                ref.name, [n for n in self.table if n.startswith(ref.parts[0] + ".")], "")
        if not hint.startswith("did you mean"):
            hint = "known names: " + ", ".join(sorted(self.table)[:16]) + (", ..." if len(self.table) > 16 else "")
        raise SpecError(loc.shifted(ref.col), f"'{ref.name}' names no {wanted} in this spec", hint)


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


RESERVED_INPUTS = ("self",)  # a model is called as `model(**inputs)`, where `self` cannot be a keyword


def _check_unique_names(spec: Spec) -> None:
    for name, decl in spec.inputs.items():
        if name in RESERVED_INPUTS:
            raise SpecError(decl.loc, f"an input cannot be called '{name}': models take their inputs as keyword arguments",
                            f"rename it, e.g. '{name}_input'")
    seen: dict[str, tuple[str, Loc]] = {}
    groups = [("input", spec.inputs, lambda d: d.loc), ("stream", spec.streams, lambda d: d.loc),
              ("encoder", spec.encoders, lambda d: d.loc), ("output", spec.outputs, lambda d: d.loc),
              ("loss", spec.losses, lambda d: d.loc)]
    for kind, table, where in groups:
        for name, decl in table.items():
            if name in seen:
                other_kind, other_loc = seen[name]
                raise SpecError(where(decl), f"the name '{name}' is used by {_a(other_kind)} (line {other_loc.line}) and {_a(kind)}",
                                "give each input, stream, encoder, output and loss its own name", code="S101")
            seen[name] = (kind, where(decl))


def build_graph(spec: Spec) -> Graph:
    """Build the dataflow graph of ``spec`` (no shapes yet; see `avdsl.passes.shapes`)."""
    _check_unique_names(spec)
    graph = Graph(spec)
    names = _Names()
    for decl in spec.inputs.values():
        graph.add(InputNode(id=decl.name, outputs=(decl.name,), loc=decl.loc, decl=decl))
        names.add(decl.name, decl.name, "input")

    stream_tensor: dict[str, str] = {}
    encoder_outputs: dict[str, str] = {}  # "enc.stream" / "enc.pass.stream" -> tensor
    pending_from = []
    for name, s in spec.streams.items():
        if s.source == "from":
            pending_from.append(s)
            continue
        stream_tensor[name] = _embed_stream(graph, spec, names, s)

    # encoders and `from:` streams interleave: a `from` stream needs its encoder, which may need it
    todo_encoders = dict(spec.encoders)
    for _ in range(len(spec.encoders) + len(pending_from) + 1):
        progressed = False
        for s in list(pending_from):
            ref = s.from_ref.name
            if ref in encoder_outputs:
                stream_tensor[s.name] = _embed_stream(graph, spec, names, s, encoder_outputs[ref])
                pending_from.remove(s)
                progressed = True
        for ename, enc in list(todo_encoders.items()):
            missing = [st for st in enc.streams if st not in stream_tensor]
            mem_missing = [r for m in enc.memory.values() for r in _refs(m) if r.name not in encoder_outputs]
            if any(st not in spec.streams for st in enc.streams):
                bad = next(st for st in enc.streams if st not in spec.streams)
                raise SpecError(enc.locs.get("streams", enc.loc), f"encoder '{ename}' lists stream '{bad}', which is not declared",
                                did_you_mean(bad, spec.streams, "a stream"))
            if missing or mem_missing:
                continue
            _add_encoder(graph, spec, ename, enc, stream_tensor, encoder_outputs, names)
            del todo_encoders[ename]
            progressed = True
        if not progressed:
            break
    for s in pending_from:
        ref = s.from_ref
        loc = s.locs["from"].shifted(ref.col)
        known = list(encoder_outputs)
        if ref.parts[0] in spec.encoders and ref.parts[0] in todo_encoders:
            raise SpecError(loc, f"stream '{s.name}' continues from '{ref.name}', but encoder '{ref.parts[0]}' itself needs '{s.name}' (a cycle)",
                            "a stream cannot feed the encoder it comes from")
        raise SpecError(loc, f"`from: {ref.name}` names no encoder output", did_you_mean(ref.name, known, "an encoder output")
                        or "write `encoder.stream` (or `encoder.pass.stream` for encoders with passes)")
    for ename, enc in todo_encoders.items():
        missing = [(st, enc.loc) for st in enc.streams if st not in stream_tensor]
        missing += [(r.name, spec.loc("encoders", ename, "memory", local).shifted(r.col))
                    for local, m in enc.memory.items() for r in _refs(m) if r.name not in encoder_outputs]
        name, loc = missing[0]
        raise SpecError(loc, f"encoder '{ename}' cannot run: its input '{name}' is never computed",
                        did_you_mean(name, list(encoder_outputs), "an encoder output") or
                        "check for a cycle between encoders and `from:` streams")

    for name, s in spec.streams.items():
        names.add(name, stream_tensor[name], "stream")
        if s.mask is not None:
            names.add(f"{name}.mask", f"{name}.mask", "stream mask")
    for key, tensor in encoder_outputs.items():
        names.add(key, tensor, "encoder output")
    for name in spec.encoders:
        names.kinds[name] = "encoder"

    _add_outputs(graph, spec, names)
    _add_losses(graph, spec, names)
    graph.connect()
    try:
        cycle = nx.find_cycle(graph.g)
        node = graph.node(cycle[0][0])
        raise SpecError(node.loc, "the outputs depend on each other in a cycle: " + " -> ".join(c[0] for c in cycle),
                        "an output cannot use itself, directly or through other outputs")
    except nx.NetworkXNoCycle:
        pass
    return graph


def _embed_stream(graph: Graph, spec: Spec, names: _Names, s, source: str | None = None) -> str:
    """Add the nodes that turn a stream's source into its tokens; return the final tensor name."""
    current = None
    if s.source == "latent":
        current = f"{s.name}/latent"
        graph.add(LatentNode(id=f"{s.name}/latent", outputs=(current,), loc=s.locs.get("latent", s.loc), stream=s.name, count=s.latent))
    elif s.source == "input":
        if s.input not in spec.inputs:
            raise SpecError(s.locs["input"], f"stream '{s.name}' reads input '{s.input}', which is not declared",
                            did_you_mean(s.input, spec.inputs, "an input"))
        op = ops.get(s.tokenizer.name, "tokenizer", s.locs["tokenizer"].shifted(s.tokenizer.col))
        args = dict(ops.bind(op, s.tokenizer, s.locs["tokenizer"]))
        current = f"{s.name}/tokens"
        graph.add(TokenizeNode(id=f"{s.name}/tokenize", inputs=(s.input,), outputs=(current,), loc=s.locs["tokenizer"],
                               stream=s.name, op=op.name, args=args))
    else:
        # project to the new width first, then restore masked positions with a mask token of that width (MAE)
        _check_share(spec, s)
        current = f"{s.name}/from"
        graph.add(FromNode(id=f"{s.name}/from", inputs=(source,), outputs=(current,), loc=s.locs["from"], stream=s.name,
                           share=s.share))
        if s.restore is not None:
            if s.restore not in spec.streams or spec.streams[s.restore].mask is None:
                masked = [n for n, d in spec.streams.items() if d.mask is not None]
                raise SpecError(s.locs["restore"], f"`restore: {s.restore}` must name a stream with `mask:`",
                                did_you_mean(s.restore, masked, "a masked stream"))
            graph.add(RestoreNode(id=f"{s.name}/restore", inputs=(current, f"{s.restore}.mask", f"{s.restore}.ids"),
                                  outputs=(f"{s.name}/restored",), loc=s.locs["restore"], stream=s.name, masked=s.restore,
                                  share=s.share))
            current = f"{s.name}/restored"

    if s.cls and s.cls_position:
        if s.drop is not None or s.mask is not None:
            raise SpecError(s.locs["cls_position"], f"stream '{s.name}' prepends CLS tokens before positions and also drops tokens, "
                            "which could drop the CLS tokens", "remove `cls_position` (CLS tokens then come after dropping)")
        current = _prepend_cls(graph, s, current)
    if s.position is not None:
        op = ops.get(s.position.name, "position", s.locs["position"].shifted(s.position.col))
        args = dict(ops.bind(op, s.position, s.locs["position"]))
        if not op.adds_nothing:
            out = f"{s.name}/pos"
            graph.add(PositionNode(id=f"{s.name}/position", inputs=(current,), outputs=(out,), loc=s.locs["position"],
                                   stream=s.name, op=op.name, args=args))
            current = out
    if s.type_embedding:
        out = f"{s.name}/typed"
        graph.add(TypeEmbedNode(id=f"{s.name}/type", inputs=(current,), outputs=(out,), loc=s.locs["type_embedding"], stream=s.name))
        current = out
    for key in ("drop", "mask"):
        call = getattr(s, key)
        if call is None:
            continue
        op = ops.get(call.name, "drop", s.locs[key].shifted(call.col))
        args = ops.bind(op, call, s.locs[key])
        if not 0.0 <= args["rate"] < 1.0:
            raise SpecError(s.locs[key].shifted(args.cols.get("rate", 0)),
                            f"{op.name} rate must be at least 0 and less than 1, got {args['rate']}",
                            f"a rate of 1 would drop every token; e.g. `{op.name}(0.5)` keeps half the tokens; "
                            f"`{op.name}(0)` keeps all of them, and `--set streams.{s.name}.{key}=null` removes the `{key}:`")
        if op.writes_mask != (key == "mask"):
            want = next(o.name for o in ops.of_category("drop") if o.writes_mask == (key == "mask"))
            raise SpecError(s.locs[key].shifted(call.col), f"`{key}:` takes {want}(rate), not {op.name}()",
                            f"write `{key}: {want}({args['rate']})`")
        out = f"{s.name}/kept"
        outputs = (out, f"{s.name}.mask", f"{s.name}.ids") if key == "mask" else (out,)
        graph.add(DropNode(id=f"{s.name}/{key}", inputs=(current,), outputs=outputs, loc=s.locs[key], stream=s.name,
                           op=op.name, rate=args["rate"]))
        current = out
    if s.cls and not s.cls_position:
        current = _prepend_cls(graph, s, current)
    return current


def _prepend_cls(graph: Graph, s, current: str) -> str:
    """Learned CLS / aggregation tokens in front of a stream's tokens: after positions (VATT's
    aggregation token, the default) or, with ``cls_position``, before them, so they get a position (ViT, MBT)."""
    out = f"{s.name}/cls"
    graph.add(LatentNode(id=f"{s.name}/cls", inputs=(current,), outputs=(out,), loc=s.locs["cls"], stream=s.name,
                         count=s.cls, prepend=True))
    return out


def _check_share(spec: Spec, s) -> None:
    """``share: other`` must name another `from:` stream that owns its weights and restores like this one."""
    if s.share is None:
        return
    loc = s.locs["share"]
    owner = spec.streams.get(s.share)
    if owner is None or owner.source != "from" or owner.name == s.name:
        others = [n for n, d in spec.streams.items() if d.source == "from" and n != s.name]
        raise SpecError(loc, f"`share: {s.share}` must name another `from:` stream", did_you_mean(s.share, others, "a `from:` stream"))
    if owner.share is not None:
        raise SpecError(loc, f"stream '{s.share}' itself shares the weights of '{owner.share}'", f"write `share: {owner.share}`")
    if (owner.restore is None) != (s.restore is None):
        raise SpecError(loc, f"streams '{s.name}' and '{s.share}' share a mask token, so both or neither need `restore:`",
                        "add `restore:` to both, or remove it from both")


def _add_encoder(graph, spec, ename, enc, stream_tensor, encoder_outputs, names) -> None:
    plans = {}
    memory = tuple(enc.memory)
    for local in memory:
        if local in enc.streams:
            raise SpecError(enc.locs.get("memory", enc.loc), f"memory name '{local}' is also a stream of encoder '{ename}'",
                            f"give the memory its own local name, e.g. `memory: {{{local}_memory: {enc.memory[local].name}}}`")
    for pname, entries in enc.passes.items():
        depth = max([enc.sizes.depth] + [s.depth for s in enc.stream_sizes.values()])
        plans[pname] = plan_pass(pname, entries, enc.streams, memory, enc.weights, depth, spec.rule_sets, spec.vars)
    for s in enc.stream_sizes:
        if s not in enc.streams:
            raise SpecError(enc.locs.get("sizes", enc.loc), f"`sizes` names stream '{s}', which encoder '{ename}' does not update",
                            did_you_mean(s, enc.streams, "a stream"))
    if enc.stream_sizes and enc.weights != "per_stream":
        raise SpecError(enc.locs.get("sizes", enc.loc), "per-stream `sizes` need `weights: per_stream`",
                        "set `weights: per_stream`, or remove `sizes`")
    known = _Names()
    for key, tensor in encoder_outputs.items():
        known.add(key, tensor, "encoder output")
    memory_in = []
    for local, value in enc.memory.items():
        if isinstance(value, ex.Call):  # a projection of an encoder output, computed once before this encoder
            loc = spec.loc("encoders", ename, "memory", local)
            memory_in.append(_add_call(graph, known, value, loc, f"memory.{ename}.{local}", ("pool", "project")))
        else:
            memory_in.append(encoder_outputs[value.name])
    inputs = tuple(stream_tensor[s] for s in enc.streams) + tuple(memory_in)
    outputs = []
    for pname, plan in plans.items():
        computed = plan.streams()
        for s in computed:
            key = encoder_output(ename, pname, s)
            outputs.append(key)
            encoder_outputs[key] = key
    graph.add(EncoderNode(id=ename, inputs=inputs, outputs=tuple(outputs), loc=enc.loc, decl=enc, plans=plans,
                          streams=enc.streams, memory=memory))


def _refs(node) -> list:
    """The encoder outputs (dotted names) an expression reads, recursively."""
    if isinstance(node, ex.Ref):
        return [node] if len(node.parts) > 1 else []
    if isinstance(node, ex.Call):
        return [r for a in list(node.args) + [v for _, v in node.kwargs] for r in _refs(a)]
    return []


def _add_call(graph: Graph, names: _Names, call: ex.Call, loc: Loc, node_id: str, categories) -> str:
    """Add a call (and, recursively, the calls inside its arguments); return its output tensor."""
    op = ops.get(call.name, categories, loc.shifted(call.col))
    bound = ops.bind(op, call, loc)
    tensor_inputs, tensor_params, args = [], [], {}
    counter = [0]
    for p in op.params:
        value = bound[p.name]
        if p.kind in ("tensor", "tensors"):
            for item in (value if isinstance(value, list) else [value]):
                if isinstance(item, ex.Call):
                    counter[0] += 1
                    inner = _add_call(graph, names, item, loc, f"{node_id}~{counter[0]}", ("pool", "project", "target"))
                    tensor_inputs.append(inner)
                else:
                    tensor_inputs.append(names.resolve(item, loc))
                tensor_params.append(p.name)
        else:
            args[p.name] = value
    graph.add(CallNode(id=node_id, inputs=tuple(tensor_inputs), outputs=(node_id,), loc=loc.shifted(call.col),
                       op=op.name, args=args, tensor_params=tuple(tensor_params)))
    return node_id


def _add_outputs(graph: Graph, spec: Spec, names: _Names) -> None:
    # outputs may use each other: register all names first, then add the calls
    for name in spec.outputs:
        names.add(name, f"out.{name}", "output")
    for name, item in spec.outputs.items():
        e = item.expr
        if isinstance(e, ex.Ref):
            e = ex.Call(ops.PLAIN_OUTPUT, (e,), (), e.col)  # `za: backbone.audio` means the tokens themselves
        if not isinstance(e, ex.Call):
            raise SpecError(item.loc, f"output '{name}' must be an operator call, e.g. `mean(backbone.audio)`",
                            "arithmetic belongs in `losses:`; outputs are calls of pooling and projection operators")
        _add_call(graph, names, e, item.loc, f"out.{name}", ("pool", "project", "target"))
        graph.outputs[name] = f"out.{name}"


def _linear_terms(e, loc: Loc, scale: float = 1.0) -> list[tuple[float, ex.Call]]:
    """A loss expression as (weight, loss call) terms: sums and differences of number * call."""
    if isinstance(e, ex.Call):
        return [(scale, e)]
    if isinstance(e, ex.BinOp) and e.op in "+-":
        right = -1.0 if e.op == "-" else 1.0
        return _linear_terms(e.left, loc, scale) + _linear_terms(e.right, loc, scale * right)
    if isinstance(e, ex.BinOp) and e.op == "*":
        if isinstance(e.left, ex.Num):
            return _linear_terms(e.right, loc, scale * float(e.left.value))
        if isinstance(e.right, ex.Num):
            return _linear_terms(e.left, loc, scale * float(e.right.value))
    if isinstance(e, ex.BinOp) and e.op == "/" and isinstance(e.right, ex.Num):
        if float(e.right.value) == 0:
            raise SpecError(loc.shifted(e.right.col), "division by zero in a loss weight", "use a non-zero number")
        return _linear_terms(e.left, loc, scale / float(e.right.value))
    if isinstance(e, ex.Neg):
        return _linear_terms(e.operand, loc, -scale)
    col = getattr(e, "col", 0)
    raise SpecError(loc.shifted(col), "a loss must be a weighted sum of loss calls",
                    "e.g. `nce(za, zv, tau=0.08) + 0.5 * ce(logits, label)`; weights are plain numbers")


def _add_losses(graph: Graph, spec: Spec, names: _Names) -> None:
    for name, item in spec.losses.items():
        terms = _linear_terms(item.expr, item.loc)
        inputs, weights = [], []
        for i, (weight, call) in enumerate(terms):
            if not math.isfinite(weight) or abs(weight) > MAX_LOSS_WEIGHT:
                raise SpecError(item.loc.shifted(call.col), f"the weight of this loss term is {weight:g}",
                                f"loss weights are ordinary numbers, at most {MAX_LOSS_WEIGHT:g} in size")
            tensor = _add_call(graph, names, call, item.loc, f"loss.{name}~{i + 1}", ("loss",))
            inputs.append(tensor)
            weights.append(weight)
        graph.add(LossNode(id=f"loss.{name}", inputs=tuple(inputs), outputs=(f"loss.{name}",), loc=item.loc, name=name,
                           weights=tuple(weights)))
        graph.losses[name] = f"loss.{name}"
