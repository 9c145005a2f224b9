"""Graph -> readable Python source for the model's ``forward``.

The generated function is what `avdsl build --emit code` prints and what runs: one line per graph
node, each commented with the shape it produces, grouped by spec component with the spec line it
came from. Module attributes are named after graph nodes (``self.audio_tokenize``), functional
operators come from ``H`` (pooling, `avdsl.runtime.heads`) and ``L`` (losses, `avdsl.runtime.losses`).
Pure string work: the language side never imports torch.
"""
from __future__ import annotations

import re

from . import ops
from .ir import (CallNode, DropNode, EncoderNode, FromNode, Graph, InputNode, LatentNode, LossNode,
                 PositionNode, RestoreNode, TokenizeNode, TypeEmbedNode)
from .ops import fmt

MODULE_OPS = ("linear", "mlp", "bn", "layernorm")  # call operators with weights (modules)
FUNCTION_OPS = ("mean", "first", "avg", "tokens", "relu", "l2norm")  # in runtime.heads
LOSS_OPS = tuple(n for n, o in ops.OPS.items() if o.category == "loss")


def var(tensor: str) -> str:
    """A Python identifier for a tensor name: ``backbone.audio`` -> ``backbone_audio``."""
    name = re.sub(r"[^0-9A-Za-z_]", "_", tensor)
    return name if not name[0].isdigit() else f"t_{name}"


def attr(node_id: str) -> str:
    """The module attribute for a node id: ``audio/tokenize`` -> ``audio_tokenize``."""
    return var(node_id)


def module_attr(node) -> str:
    """The module a stream node runs: its own, or, with ``share:``, that of the stream it shares."""
    share = getattr(node, "share", None)
    if share and isinstance(node, (FromNode, RestoreNode)):
        return attr(f"{share}/{node.id.split('/', 1)[1]}")
    return attr(node.id)


def optional_inputs(graph: Graph) -> set[str]:

    """Inputs only losses read (labels, captions used as targets): the model runs without them."""
    used_by_model = set()
    for node in graph.nodes():
        if isinstance(node, (CallNode,)) and node.op in LOSS_OPS or isinstance(node, LossNode):
            continue
        used_by_model.update(node.inputs)
    return {name for name in graph.spec.inputs if name not in used_by_model}


def comment(text) -> str:
    """User text (a path, a name) made safe for a ``#`` comment of generated code: line breaks and
    every other control character are escaped, so the text can never end the comment and become code."""
    shown = str(text)
    if any(not ch.isprintable() for ch in shown):
        shown = repr(shown)[1:-1]
    return shown


def _literal(value) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "(" + ", ".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def _shape(graph: Graph, tensor: str) -> str:
    info = graph.tensors.get(tensor)
    return f"  # {fmt(info.shape)}" if info is not None and info.shape else ""


def generate(graph: Graph, file_label: str = "") -> str:
    """The source of ``forward(self, <inputs>)`` for the compiled model."""
    spec = graph.spec
    optional = optional_inputs(graph)
    params = [n for n in spec.inputs if n not in optional] + [f"{n}=None" for n in spec.inputs if n in optional]
    first_input = next(n for n in spec.inputs if n not in optional)  # latent tokens take its batch size
    lines = [f"def forward(self, {', '.join(params)}):"]
    body: list[str] = []
    last_group = None

    def emit(group: str, loc, text: str):
        nonlocal last_group
        if group != last_group:
            body.append("")
            body.append(f"# {comment(group)}  ({comment(loc.file)}:{loc.line})" if loc else f"# {comment(group)}")
            last_group = group
        body.append(text)

    loss_lines: dict[str, list[str]] = {}
    for node in graph.nodes():
        out = node.outputs[0] if node.outputs else None
        if isinstance(node, InputNode):
            continue
        if isinstance(node, (TokenizeNode, PositionNode, TypeEmbedNode, FromNode, DropNode, RestoreNode, LatentNode)):
            group = f"stream {node.stream}"
            decl = spec.streams[node.stream]
            args = ", ".join(var(i) for i in node.inputs)
            if isinstance(node, LatentNode) and not node.prepend:
                text = f"{var(out)} = self.{attr(node.id)}({first_input})"
            elif isinstance(node, LatentNode):
                text = f"{var(out)} = self.{attr(node.id)}.prepend({args})"
            elif isinstance(node, DropNode) and node.op == "random_mask":
                text = f"{', '.join(var(o) for o in node.outputs)} = self.{attr(node.id)}({args})"
            elif isinstance(node, FromNode) and graph.tensors[node.inputs[0]].shape[-1] == graph.tensors[out].shape[-1]:
                text = f"{var(out)} = {args}"
            else:
                text = f"{var(out)} = self.{module_attr(node)}({args})"
            emit(group, decl.loc, text + _shape(graph, out))

        elif isinstance(node, EncoderNode):
            group = f"encoder {node.id}"
            kwargs = ", ".join(f"{s}={var(t)}" for s, t in zip(node.streams + node.memory, node.inputs))
            emit(group, node.loc, f"{var(node.id)} = self.{attr(node.id)}({kwargs})")
            for o in node.outputs:
                key = o[len(node.id) + 1:]
                emit(group, node.loc, f"{var(o)} = {var(node.id)}[{key!r}]" + _shape(graph, o))
        elif isinstance(node, CallNode):
            call = _call_text(node)
            if node.id.startswith("loss."):
                name = node.id[len("loss."):].split("~")[0]
                loss_lines.setdefault(name, []).append(f"{var(out)} = {call}")
                continue
            group = "outputs"
            emit(group, None, f"{var(out)} = {call}" + _shape(graph, out))
        elif isinstance(node, LossNode):
            terms = " + ".join(f"{w!r} * {var(t)}" if w != 1.0 else var(t) for w, t in zip(node.weights, node.inputs))
            needs = sorted({i for t in node.inputs for i in graph.inputs_of(t) if i in optional})
            block = loss_lines.get(node.name, []) + [f"losses[{node.name!r}] = {terms}"]
            if needs:
                cond = " and ".join(f"{n} is not None" for n in needs)
                block = [f"if {cond}:"] + ["    " + b for b in block]
            emit("losses", None, "\n".join(block))
    if graph.losses:
        body.insert(0, "losses = {}")
    else:
        body.insert(0, "losses = {}  # this spec declares no losses")
    body.append("")
    body.append("# results")
    body.append("loss = sum(losses.values()) if losses else None")
    outs = ", ".join(f"{name!r}: {var(t)}" for name, t in graph.outputs.items())
    body.append(f"outputs = {{{outs}}}")
    body.append('return {"loss": loss, "losses": losses, "outputs": outputs}')
    for b in body:
        for line in b.split("\n"):
            lines.append(("    " + line) if line else "")
    header = (f"# Generated by avdsl from {comment(file_label or spec.source.file)} (spec {spec.source.hash()}). "
              "Edit the spec, not this code.")
    return header + "\n" + "\n".join(lines) + "\n"



def _call_text(node: CallNode) -> str:
    args = [var(i) for i in node.inputs]
    op = node.op
    if op == "linear" and node.args.get("shared"):
        return f"self.{attr('out.' + node.args['shared'])}({args[0]})"
    if op in MODULE_OPS:
        return f"self.{attr(node.id)}({args[0]})"
    kwargs = ", ".join(f"{k}={_literal(v)}" for k, v in node.args.items())
    joined = ", ".join(args + ([kwargs] if kwargs else []))
    if op in FUNCTION_OPS:
        return f"H.{op}({joined})"
    if op == "patches":
        return f"L.patchify({args[0]}, {_literal(node.args['size'])})"
    return f"L.{op}({joined})"
