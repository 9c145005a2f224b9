"""Compile a graph into a PyTorch module: build the runtime modules, bind the generated ``forward``.

This is the one place where the language meets the runtime (the import goes this way only). The
model's ``forward`` is the source from `avdsl.codegen`, compiled with its own file name so that
tracebacks and ``torch.compile`` point at readable lines (``avdsl build --emit code`` shows it).
"""
from __future__ import annotations

import difflib
import importlib
import linecache
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from . import codegen, ops
from .ir import CallNode, EncoderNode, Graph, visit
from .passes.cost import count
from .passes.memory import check_fits, host_memory
from .passes.shapes import call_bound, weight_sets
from .runtime import embeddings as E
from .runtime.contracts import Classifier, EvalPlan, InputSpec, RetrievalPair
from .runtime.encoder import Attend, LayerSizes, StreamTransformer


def resolve(target: str):
    """The runtime object a catalogue entry names: ``"heads.MLP"`` in `avdsl.runtime`, or ``"torch.nn.Linear"``."""
    module, name = target.rsplit(".", 1)
    path = module if module.split(".")[0] == "torch" else f"{__package__}.runtime.{module}"
    return getattr(importlib.import_module(path), name)


def _build(runtime: ops.Runtime) -> nn.Module:
    return resolve(runtime.target)(*runtime.args)


def _tokenize(node, graph: Graph):
    x, out = graph.tensors[node.inputs[0]], graph.tensors[node.outputs[0]]
    b = ops.bound_for(ops.OPS[node.op], {**node.args, "x": x.shape}, kind=graph.spec.inputs[node.inputs[0]].kind,
                      width=out.shape[-1], out=out.shape)
    return _build(ops.OPS[node.op].module(b))


def _position(node, graph: Graph):
    x = graph.tensors[node.inputs[0]]
    return _build(ops.OPS[node.op].module(ops.bound_for(ops.OPS[node.op], {**node.args, "x": x.shape}, grid=x.grid, width=x.shape[-1])))


def _drop(node, graph: Graph):
    op = ops.OPS[node.op]
    return _build(op.module(ops.bound_for(op, {"rate": node.rate, "x": graph.tensors[node.inputs[0]].shape})))


def _restore(node, graph: Graph):
    if node.share:
        return None  # runs the module of the stream it shares (see `codegen`)
    return E.Restore(graph.tensors[node.outputs[0]].shape[-1])


def _from(node, graph: Graph):
    w_in, w_out = graph.tensors[node.inputs[0]].shape[-1], graph.tensors[node.outputs[0]].shape[-1]
    return nn.Linear(w_in, w_out) if w_in != w_out and not node.share else None


def _call(node, graph: Graph):
    op = ops.OPS[node.op]
    if not ops.has_module(op, node.args):
        return None  # a function, or the module of the output it shares (see `codegen`)
    return _build(op.module(call_bound(node, graph)))


NO_DECAY_KINDS = ("position", "typeembed", "latent", "restore", "drop")  # learned tables and tokens: no weight decay

MODULES = {
    "input": lambda node, graph: None,
    "tokenize": _tokenize,
    "position": _position,
    "typeembed": lambda node, graph: E.TypeEmbedding(graph.tensors[node.inputs[0]].shape[-1]),
    "latent": lambda node, graph: E.LatentTokens(node.count, graph.tensors[node.outputs[0]].shape[-1]),
    "drop": _drop,
    "restore": _restore,
    "from": _from,
    "encoder": lambda node, graph: build_encoder(node, graph),
    "call": _call,
    "loss": lambda node, graph: None,
}


def build_encoder(node: EncoderNode, graph: Graph) -> StreamTransformer:
    enc = node.decl
    plans = {p: [tuple(Attend(a.query, a.keys, a.weights, a.causal, a.cross) for a in layer.attends) for layer in plan.layers]
             for p, plan in node.plans.items()}
    sizes = {w: LayerSizes(s.sizes.width, s.sizes.depth, s.sizes.heads, s.sizes.mlp_dim) for w, s in weight_sets(node).items()}
    stream_in = dict(zip(node.streams + node.memory, node.inputs))
    memory_widths = {m: graph.tensors[t].shape[-1] for m, t in stream_in.items()}  # what `(cross)` may read
    return StreamTransformer(plans, sizes, memory_widths=memory_widths, norms=enc.norms, final_norm=enc.final_norm,
                             bias=enc.bias, eps=enc.norm_eps, activation=enc.activation, dropout=enc.dropout,
                             pre_norm=enc.pre_norm, memory_norm=enc.memory_norm, cross_mlp=enc.cross_mlp)


def input_specs(graph: Graph) -> list[InputSpec]:
    out = []
    for decl in graph.spec.inputs.values():
        out.append(InputSpec(decl.name, decl.kind, tuple(d for d in decl.dims[1:]), decl.classes, decl.sample_rate))
    return out


def eval_plan(graph: Graph) -> EvalPlan:
    """What held-out evaluation should measure, read off the losses by what their operators evaluate
    (`OpDef.contrastive`, `OpDef.evaluates`): retrieval pairs, classifiers, reconstruction, captioning."""
    outputs_by_tensor = {t: n for n, t in graph.outputs.items()}
    retrieval, classifiers, recon, caption = [], [], [], []

    def add(items: list, item) -> None:
        if item not in items:
            items.append(item)

    for name, tensor in graph.losses.items():
        loss_node = graph.node(graph.producer[tensor])
        for term in loss_node.inputs:
            call = graph.node(graph.producer[term])
            op = ops.OPS[call.op]
            ins = [outputs_by_tensor.get(i, i) for i in call.inputs]
            if op.contrastive and all(i in graph.outputs for i in ins[:2]):
                add(retrieval, RetrievalPair(ins[0], ins[1]))
            elif op.evaluates in ("classifier", "multilabel") and ins[0] in graph.outputs:
                add(classifiers, Classifier(ins[0], ins[1], op.evaluates == "multilabel"))
            elif op.evaluates == "reconstruction":
                add(recon, name)
            elif op.evaluates == "caption":
                add(caption, name)
    # an output averaging classifier logits (MBT: per-modality heads, averaged at evaluation) is scored too
    scored = {c.logits: c for c in classifiers}
    for out_name, tensor in graph.outputs.items():
        node = graph.node(graph.producer[tensor])
        if isinstance(node, CallNode) and ops.OPS[node.op].evaluates == "average":
            parts = [scored.get(outputs_by_tensor.get(i)) for i in node.inputs]
            if parts and all(parts) and len({(c.target, c.multilabel) for c in parts}) == 1:
                classifiers.insert(0, Classifier(out_name, parts[0].target, parts[0].multilabel))
    return EvalPlan(tuple(retrieval), tuple(classifiers), tuple(recon), tuple(caption))


class CompiledModel(nn.Module):
    """A model built from a spec. ``forward(**inputs)`` runs the generated code (see ``self.code``)
    and returns ``{"loss", "losses", "outputs"}`` (the contract in `avdsl.runtime.contracts`)."""

    def __init__(self, graph: Graph, modules: dict[str, nn.Module], emitted: codegen.Emitted, filename: str):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        code = self.code = emitted.code
        # every loss term's weight (see `losses.weighted`); not saved in checkpoints: the spec gives it
        self.register_buffer("loss_weights", torch.tensor(emitted.loss_weights, dtype=torch.float64), persistent=False)
        self.no_weight_decay = tuple(emitted.attrs[n.id] for n in graph.nodes() if n.kind in NO_DECAY_KINDS
                                     and emitted.attrs[n.id] in modules)
        self.arg_names = {name: param for name, param in emitted.params.items() if name != param}  # renamed inputs
        # stream -> its random masking (or else token dropping) module, for `embeddings.given_noise`
        drops = sorted((n for n in graph.nodes() if n.kind == "drop"), key=lambda n: not ops.OPS[n.op].writes_mask)
        self.token_drops = {}
        for n in drops:
            self.token_drops.setdefault(n.stream, emitted.attrs[n.id])
        self.inputs = input_specs(graph)
        self.eval_plan = eval_plan(graph)
        self.spec_text = graph.spec.source.resolved_text()
        self.spec_hash = graph.spec.source.hash()
        self.spec_name = graph.spec.name
        namespace = {alias: importlib.import_module(f"{__package__}.runtime.{module}")
                     for module, alias in codegen.RUNTIME_GLOBALS.items()}
        namespace["torch"] = torch
        for name, text in ((filename, code), (f"{filename}:keeping", emitted.keeping_code)):
            linecache.cache[name] = (len(text), None, text.splitlines(True), name)
            exec(compile(text, name, "exec"), namespace)  # the forward --emit code shows, and its variant for `keep`
        self._generated, self._generated_keeping = namespace["forward"], namespace["forward_keeping"]
        # what `keep` can return: graph tensors, and each encoder output after each layer
        self._tensor_names = tuple(codegen.kept_tensors(graph))
        self._layer_names = layer_names(graph, emitted.attrs)
        self._keep: tuple[dict, set] | None = None  # while in `keep`: (the dict it fills, the names it wants)

    def forward(self, **inputs):
        if self.arg_names:
            inputs = {self.arg_names.get(name, name): value for name, value in inputs.items()}
        if self._keep is None:
            return self._generated(self, **inputs)
        return self._forward_keeping(inputs)

    def _forward_keeping(self, inputs: dict) -> dict:
        kept, wanted = self._keep
        encoders = {attr for name, (attr, _) in self._layer_names.items() if name in wanted}
        for attr in encoders:
            getattr(self, attr).kept = {}
        try:
            result = self._generated_keeping(self, **inputs)
            kept.update({name: value for name, value in result.pop("tensors").items() if name in wanted})
            for name, (attr, key) in self._layer_names.items():
                if name in wanted:
                    kept[name] = getattr(self, attr).kept[key]
        finally:
            for attr in encoders:
                getattr(self, attr).kept = None
        return result


def layer_names(graph: Graph, attrs: dict) -> dict[str, tuple[str, str]]:
    """``ENCODER[.PASS].STREAM@LAYER`` -> (the encoder's module attribute, its key in the encoder's
    ``kept``): every output stream of every pass after each of the pass's layers (0-based)."""
    out = {}
    for node in graph.of_type(EncoderNode):
        for pname, plan in node.plans.items():
            queries = dict.fromkeys(a.query for layer in plan.layers for a in layer.attends)
            for s in queries:
                key = f"{pname}.{s}" if pname else s
                for li in range(len(plan.layers)):
                    out[f"{node.id}.{key}@{li}"] = (attrs[node.id], f"{key}@{li}")
    return out


@contextmanager
def keep(model: CompiledModel, names: Iterable[str]):
    """Intermediate tensors by name. Within the block, each call of ``model`` also stores the named
    tensors (those of the last call) in the dict the block yields::

        with keep(model, ["unimodal.audio@3", "joint.av.a", "audio/kept"]) as kept:
            model(**batch)
        kept["unimodal.audio@3"]       # [B, N, D]

    Names: any tensor `avdsl build --emit graph` lists (``audio/tokens``, ``audio.mask``,
    ``joint.av.a``, ``out.audio_pred``...; not loss terms: the result's ``losses`` has the losses), and
    ``ENCODER[.PASS].STREAM@LAYER``: an encoder output after layer LAYER (0-based, before the final
    norm). The tensors are not detached. Outside the block the model runs its plain ``forward``."""
    names = set(names)
    known = set(model._tensor_names) | set(model._layer_names)
    unknown = sorted(names - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; names: {', '.join(sorted(known)[:12])}..."
        raise ValueError(f"no tensor named {', '.join(unknown)} in this model{hint}")
    kept: dict = {}
    model._keep = (kept, names)
    try:
        yield kept
    finally:
        model._keep = None


def device_memory(device: str | torch.device | None) -> int:
    """Bytes of memory on ``device``: the GPU's total, or what this process may use of the host's."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[1]
    return host_memory()


def compile_graph(graph: Graph, device: str | torch.device | None = None) -> CompiledModel:
    """Build every module of ``graph`` (on ``device``; ``"meta"`` allocates nothing) and bind the code."""
    if str(device) != "meta":  # refuse what cannot fit before allocating it
        check_fits(graph, count(graph), 0, False, device_memory(device))
    emitted = codegen.emit(graph)
    filename = f"<avdsl:{graph.spec.name}:{graph.spec.source.hash()}>"
    with torch.device(device or "cpu"):
        modules = {}
        for node in graph.nodes():
            module = visit(MODULES, node, graph)
            if module is not None:
                modules[emitted.attrs[node.id]] = module
        if str(device) != "meta":  # meta tensors hold no values: nothing to initialise
            for m in modules.values():
                E.init_linear(m)
        model = CompiledModel(graph, modules, emitted, filename)
    return model
