"""Graph -> readable Python source for the model's ``forward``.

The generated function is what `avdsl build --emit code` prints and what runs: one line per graph
node, each commented with the shape it produces, grouped by spec component with the spec line it
came from. Module attributes are named after graph nodes (``self.audio_tokenize``); operators without
weights are the runtime functions their catalogue entry names, reached through one global per runtime
module (``H`` for `avdsl.runtime.heads`, ``L`` for `avdsl.runtime.losses`).

Every identifier the code uses comes from a `Namespace`, so no spec name can shadow a keyword, a
builtin, a global of the generated module or another generated name: an input called ``lambda``,
``sum`` or ``H`` gets a parameter name of its own, and `Emitted.params` maps it back. User text appears
only in quoted literals and comments. Pure string work: the language side never imports torch.
"""
from __future__ import annotations

import builtins
import keyword
import re
from dataclasses import dataclass

from . import ops
from .ir import STREAM_KINDS, CallNode, EncoderNode, Graph, LossNode, visit
from .ops import fmt

RUNTIME_GLOBALS = {"heads": "H", "losses": "L"}  # runtime module -> its global in the generated code
LOCALS = ("losses", "loss", "outputs")  # the fixed local names of the generated forward
GLOBALS = ("self", "torch") + tuple(RUNTIME_GLOBALS.values())
# attributes of the compiled model (an nn.Module) that a module attribute must not replace
MODULE_ATTRS = frozenset((
    "T_destination", "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children", "code", "compile", "cpu",
    "cuda", "double", "dump_patches", "eval", "eval_plan", "extra_repr", "float", "forward", "get_buffer",
    "get_extra_state", "get_parameter", "get_submodule", "half", "inputs", "ipu", "load_state_dict", "loss_weights", "modules", "mtia",
    "named_buffers", "named_children", "named_modules", "named_parameters", "no_weight_decay", "arg_names", "token_drops", "parameters",
    "register_backward_hook", "register_buffer", "register_forward_hook", "register_forward_pre_hook",
    "register_full_backward_hook", "register_full_backward_pre_hook", "register_load_state_dict_post_hook",
    "register_load_state_dict_pre_hook", "register_module", "register_parameter", "register_state_dict_post_hook",
    "register_state_dict_pre_hook", "requires_grad_", "set_extra_state", "set_submodule", "share_memory", "spec_hash",
    "spec_name", "spec_text", "state_dict", "to", "to_empty", "train", "training", "type", "xpu", "zero_grad"))


class Namespace:
    """Unique Python identifiers for names from a spec, like torch.fx's: each key gets the readable
    form of its name (``backbone.audio`` -> ``backbone_audio``), suffixed ``_1``, ``_2``... when that is
    reserved or already given to another key. The same key always gets the same identifier."""

    def __init__(self, reserved=(), private_prefix: str = ""):
        self.used = set(reserved) | set(keyword.kwlist)
        self.private_prefix = private_prefix  # prefix for names that would start with "_"
        self.given: dict = {}

    def __call__(self, key, name: str | None = None) -> str:
        if key in self.given:
            return self.given[key]
        base = re.sub(r"[^0-9A-Za-z_]", "_", name if name is not None else str(key)) or "t"
        if base[0].isdigit():
            base = f"t_{base}"
        if base.startswith("_") and self.private_prefix:
            base = self.private_prefix + base
        candidate, i = base, 0
        while candidate in self.used:
            i += 1
            candidate = f"{base}_{i}"
        self.used.add(candidate)
        self.given[key] = candidate
        return candidate


def comment_text(text: str) -> str:
    """User text (a file name) made safe for a one-line comment: no line breaks or other control characters."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def local_names() -> Namespace:
    return Namespace(set(dir(builtins)) | set(GLOBALS) | set(LOCALS))


def attr_names(graph: Graph) -> dict[str, str]:
    """The module attribute of every node id (``audio/tokenize`` -> ``audio_tokenize``), whether or not it has one."""
    names = Namespace(MODULE_ATTRS, private_prefix="m")
    return {node.id: names(node.id) for node in graph.nodes()}


def optional_inputs(graph: Graph) -> set[str]:
    """Inputs only losses read (labels, captions used as targets): the model runs without them."""
    used_by_model = set()
    for node in graph.nodes():
        if isinstance(node, CallNode) and ops.OPS[node.op].category == "loss" or isinstance(node, LossNode):
            continue
        used_by_model.update(node.inputs)
    return {name for name in graph.spec.inputs if name not in used_by_model}


def _literal(value) -> str:
    if isinstance(value, list):
        return "(" + ", ".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def _is_keyword_safe(name: str) -> bool:
    """Whether ``name`` can be passed as ``name=value`` to a module call (not a keyword, not ``self``)."""
    return name.isidentifier() and not keyword.iskeyword(name) and name != "self"


@dataclass(frozen=True)
class Emitted:
    code: str  # the source of ``forward``
    params: dict  # input name -> its parameter name in ``forward`` (differs when the name is taken)
    attrs: dict  # node id -> module attribute name
    keeping_code: str  # ``forward_keeping``: the same body, also returning {"tensors": {graph tensor name: value}}
    loss_weights: tuple[float, ...] = ()  # the values of ``self.loss_weights``: every loss term's weight, in code order


class _Emitter:
    """The state of one generation: the names given so far and the lines written."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.var = local_names()
        self.attrs = attr_names(graph)
        self.optional = optional_inputs(graph)
        self.body: list[str] = []
        self.loss_lines: dict[str, list[str]] = {}
        self.loss_weights: list[float] = []  # one per loss term, read by the code as ``self.loss_weights[i:j]``
        self.last_group = None
        self.first_input = ""  # the parameter latent tokens take their batch size from (set by `emit`)

    def tensor(self, name: str) -> str:
        return self.var(("tensor", name), name)

    def emit(self, group: str, loc, text: str) -> None:
        if group != self.last_group:
            self.body.append("")
            self.body.append(comment_text(f"# {group}  ({loc.file}:{loc.line})" if loc else f"# {group}"))
            self.last_group = group
        self.body.append(text)

    def shape(self, tensor: str) -> str:
        info = self.graph.tensors.get(tensor)
        return comment_text(f"  # {fmt(info.shape)}") if info is not None and info.shape else ""

    def module_attr(self, node) -> str:
        """The module a stream node runs: its own, or, with ``share:``, that of the stream it shares."""
        share = getattr(node, "share", None)
        if share:
            return self.attrs[f"{share}/{node.id.split('/', 1)[1]}"]
        return self.attrs[node.id]

    # one rule per node kind

    def input(self, node) -> None:
        pass

    def stream(self, node) -> None:
        out = node.outputs[0]
        args = ", ".join(self.tensor(i) for i in node.inputs)
        outs = ", ".join(self.tensor(o) for o in node.outputs)
        if node.kind == "latent" and not node.prepend:
            text = f"{outs} = self.{self.attrs[node.id]}({self.first_input})"
        elif node.kind == "latent":
            text = f"{outs} = self.{self.attrs[node.id]}.prepend({args})"
        elif node.kind == "from" and self.graph.tensors[node.inputs[0]].shape[-1] == self.graph.tensors[out].shape[-1]:
            text = f"{outs} = {args}"
        else:
            text = f"{outs} = self.{self.module_attr(node)}({args})"
        self.emit(f"stream {node.stream}", self.graph.spec.streams[node.stream].loc, text + self.shape(out))

    def encoder(self, node: EncoderNode) -> None:
        group, result = f"encoder {node.id}", self.var(("result", node.id), node.id)
        named = list(zip(node.streams + node.memory, node.inputs))
        unsafe = ", ".join(f"{s!r}: {self.tensor(t)}" for s, t in named if not _is_keyword_safe(s))
        args = ([f"{{{unsafe}}}"] if unsafe else []) + [f"{s}={self.tensor(t)}" for s, t in named if _is_keyword_safe(s)]
        self.emit(group, node.loc, f"{result} = self.{self.attrs[node.id]}({', '.join(args)})")
        for o in node.outputs:
            key = o[len(node.id) + 1:]
            self.emit(group, node.loc, f"{self.tensor(o)} = {result}[{key!r}]" + self.shape(o))

    def call(self, node: CallNode) -> None:
        out = node.outputs[0]
        text = f"{self.tensor(out)} = {self.call_text(node)}"
        if node.id.startswith("loss."):
            self.loss_lines.setdefault(node.id[len("loss."):].split("~")[0], []).append(text)
        elif node.id.startswith("memory."):
            encoder, local = node.component[1].split(".memory.")
            self.emit(f"memory {local} of encoder {encoder}", node.loc, text + self.shape(out))
        else:
            self.emit("outputs", None, text + self.shape(out))

    def call_text(self, node: CallNode) -> str:
        op = ops.OPS[node.op]
        args = [self.tensor(i) for i in node.inputs]
        if op.share and node.args.get(op.share):
            return f"self.{self.attrs['out.' + node.args[op.share]]}({', '.join(args)})"
        if ops.has_module(op, node.args):
            return f"self.{self.attrs[node.id]}({', '.join(args)})"
        values = {k: v for k, v in node.args.items() if k != op.weights_if}  # the switch is not the function's
        if op.positional:
            args += [_literal(v) for v in values.values()]
        else:
            args += [f"{k}={_literal(v)}" for k, v in values.items()]
        module, function = op.function.rsplit(".", 1)
        return f"{RUNTIME_GLOBALS[module]}.{function}({', '.join(args)})"

    def loss(self, node: LossNode) -> None:
        # the weights are a buffer of the model, not constants of the code: runs that differ only in
        # loss weights run the same code, so a vectorized ensemble can train them together
        first = len(self.loss_weights)
        self.loss_weights.extend(node.weights)
        terms = ", ".join(self.tensor(t) for t in node.inputs)
        shown = ", ".join(f"{w:g}" for w in node.weights)
        terms = f"{RUNTIME_GLOBALS['losses']}.weighted(self.loss_weights[{first}:{len(self.loss_weights)}], {terms})  # weights {shown}"
        needs = sorted({i for t in node.inputs for i in self.graph.inputs_of(t) if i in self.optional})
        block = self.loss_lines.get(node.name, []) + [f"losses[{node.name!r}] = {terms}"]
        if needs:
            cond = " and ".join(f"{self.tensor(n)} is not None" for n in needs)
            block = [f"if {cond}:"] + ["    " + b for b in block]
        self.emit("losses", None, "\n".join(block))


def emit(graph: Graph, file_label: str = "") -> Emitted:
    """The source of ``forward(self, <inputs>)`` for the compiled model, with the names it gave."""
    spec = graph.spec
    e = _Emitter(graph)
    params = {n: e.tensor(n) for n in spec.inputs}  # inputs are named first: they keep their names when they can
    required = [n for n in spec.inputs if n not in e.optional]
    e.first_input = params[required[0]]
    signature = [params[n] for n in required] + [f"{params[n]}=None" for n in spec.inputs if n in e.optional]
    rules = {"input": e.input, "encoder": e.encoder, "call": e.call, "loss": e.loss,
             **{kind: e.stream for kind in STREAM_KINDS}}
    for node in graph.nodes():
        visit(rules, node)
    body = ["losses = {}" if graph.losses else "losses = {}  # this spec declares no losses"] + e.body
    body.append("")
    body.append("# results")
    body.append("loss = sum(losses.values()) if losses else None")
    outs = ", ".join(f"{name!r}: {e.tensor(t)}" for name, t in graph.outputs.items())
    body.append(f"outputs = {{{outs}}}")
    result = '{"loss": loss, "losses": losses, "outputs": outputs'
    header = comment_text(f"# Generated by avdsl from {file_label or spec.source.file} (spec {spec.source.hash()}). "
                          "Edit the spec, not this code.")
    code = header + "\n" + _function("forward", signature, body + [f"return {result}}}"])
    # the variant `compiler.keep` runs: every tensor the body always assigns (loss terms are in `losses`)
    kept = ", ".join(f"{t!r}: {e.tensor(t)}" for t in kept_tensors(graph))
    keeping = _function("forward_keeping", signature, body + [f'return {result}, "tensors": {{{kept}}}}}'])
    return Emitted(code, params, e.attrs, keeping, tuple(e.loss_weights))


def kept_tensors(graph: Graph) -> list[str]:
    """The graph tensors ``forward_keeping`` returns: all but those of losses (which the code computes
    only when their inputs are given; the ``losses`` result has them)."""
    return [t for t in graph.tensors if not (isinstance(node := graph.node(graph.producer[t]), LossNode)
                                             or node.id.startswith("loss."))]


def _function(name: str, signature: list[str], body: list[str]) -> str:
    lines = [f"def {name}(self, {', '.join(signature)}):"]
    for b in body:
        for line in b.split("\n"):
            lines.append(("    " + line) if line else "")
    return "\n".join(lines) + "\n"


def generate(graph: Graph, file_label: str = "") -> str:
    """The source of the model's ``forward`` (see `emit`)."""
    return emit(graph, file_label).code
