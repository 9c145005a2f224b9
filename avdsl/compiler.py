"""Compile a graph into a PyTorch module: build the runtime modules, bind the generated ``forward``.

This is the one place where the language meets the runtime (the import goes this way only). The
model's ``forward`` is the source from `avdsl.codegen`, compiled with its own file name so that
tracebacks and ``torch.compile`` point at readable lines (``avdsl build --emit code`` shows it).
"""
from __future__ import annotations

import linecache
from dataclasses import dataclass

import torch
from torch import nn

from . import codegen
from .ir import (CallNode, DropNode, EncoderNode, FromNode, Graph, LatentNode, PositionNode, RestoreNode,
                 TokenizeNode, TypeEmbedNode)
from .passes.shapes import weight_sets
from .runtime import embeddings as E
from .runtime import heads as H
from .runtime import losses as L
from .runtime.contracts import Classifier, EvalPlan, InputSpec, RetrievalPair
from .runtime.encoder import StreamTransformer


def _module_for(node, graph: Graph) -> nn.Module | None:
    """The runtime module a node needs (None for nodes that are plain functions)."""
    t = graph.tensors
    spec = graph.spec
    if isinstance(node, TokenizeNode):
        a, x, out = node.args, t[node.inputs[0]], t[node.outputs[0]]
        width = out.shape[-1]
        kind = spec.inputs[node.inputs[0]].kind
        channels = a.get("channels") or (x.shape[1] if kind in ("image", "video") else 1)
        if node.op == "patch2d":
            return E.PatchEmbed2d(channels, a["h"], a["w"], width)
        if node.op == "tubelet":
            return E.TubeletEmbed(channels, a["t"], a["h"], a["w"], width)
        if node.op == "wave1d":
            return E.WaveEmbed(a["k"], width)
        return E.TextEmbed(a["vocab"], width, a["dim"], a["frozen"])
    if isinstance(node, PositionNode):
        x = t[node.inputs[0]]
        width = x.shape[-1]
        if node.op == "learned":
            return E.LearnedPosition(node.args["size"] or x.shape[1], width, node.args["norm"])
        if node.op == "factorized":
            return E.FactorizedPosition(x.grid, width, node.args["norm"])
        return E.SinCos2dPosition(x.grid, width, node.args["first"])
    if isinstance(node, TypeEmbedNode):
        return E.TypeEmbedding(t[node.inputs[0]].shape[-1])
    if isinstance(node, LatentNode):
        return E.LatentTokens(node.count, t[node.outputs[0]].shape[-1])
    if isinstance(node, DropNode):
        n = t[node.inputs[0]].shape[1]
        return E.DropToken(node.rate, n) if node.op == "droptoken" else E.RandomMask(node.rate, n)
    if isinstance(node, (RestoreNode, FromNode)) and node.share:
        return None  # runs the module of the stream it shares (see `codegen.module_attr`)
    if isinstance(node, RestoreNode):
        return E.Restore(t[node.outputs[0]].shape[-1])
    if isinstance(node, FromNode):
        w_in, w_out = t[node.inputs[0]].shape[-1], t[node.outputs[0]].shape[-1]
        return nn.Linear(w_in, w_out) if w_in != w_out else None

    if isinstance(node, EncoderNode):
        return build_encoder(node, graph)
    if isinstance(node, CallNode) and node.op in codegen.MODULE_OPS:
        width = t[node.inputs[0]].shape[-1]
        if node.op == "linear" and node.args.get("shared"):
            return None  # runs the linear of the output it names (see `codegen._call_text`)
        if node.op == "linear":
            return nn.Linear(width, node.args["out"], bias=node.args["bias"])
        if node.op == "mlp":
            a = node.args
            return H.MLP(width, a["sizes"], a["norm"], a["act"], a["bias"], a["final_norm"])
        if node.op == "bn":
            return H.BatchNorm(width)
        return nn.LayerNorm(width)
    return None


def build_encoder(node: EncoderNode, graph: Graph) -> StreamTransformer:
    enc = node.decl
    plans = {p: [tuple((a.query, a.keys, a.weights, a.causal, a.cross) for a in layer.attends) for layer in plan.layers]
             for p, plan in node.plans.items()}
    sizes = {w: (s.sizes.width, s.sizes.depth, s.sizes.heads, s.sizes.mlp_dim) for w, s in weight_sets(node).items()}
    stream_in = dict(zip(node.streams + node.memory, node.inputs))
    memory_widths = {m: graph.tensors[stream_in[m]].shape[-1] for m in node.memory}
    return StreamTransformer(plans, sizes, memory_widths=memory_widths, norms=enc.norms, final_norm=enc.final_norm,
                             bias=enc.bias, eps=enc.norm_eps, activation=enc.activation, dropout=enc.dropout)


def input_specs(graph: Graph) -> list[InputSpec]:
    out = []
    for decl in graph.spec.inputs.values():
        out.append(InputSpec(decl.name, decl.kind, tuple(d for d in decl.dims[1:]), decl.classes, decl.sample_rate))
    return out


def eval_plan(graph: Graph) -> EvalPlan:
    """What held-out evaluation should measure, read off the losses: contrastive pairs are retrieval
    tasks, ce/bce are classifiers, masked_mse is reconstruction, next_token is captioning."""
    outputs_by_tensor = {t: n for n, t in graph.outputs.items()}
    retrieval, classifiers, recon, caption = [], [], [], []
    for name, tensor in graph.losses.items():
        loss_node = graph.node(graph.producer[tensor])
        for term in loss_node.inputs:
            call = graph.node(graph.producer[term])
            ins = [outputs_by_tensor.get(i, i) for i in call.inputs]
            if call.op in ("nce", "focal_contrastive", "mil_nce") and all(i in graph.outputs for i in ins[:2]):
                pair = RetrievalPair(ins[0], ins[1])
                if pair not in retrieval:
                    retrieval.append(pair)
            elif call.op in ("ce", "bce") and ins[0] in graph.outputs:
                c = Classifier(ins[0], ins[1], call.op == "bce")
                if c not in classifiers:
                    classifiers.append(c)
            elif call.op == "masked_mse" and name not in recon:
                recon.append(name)
            elif call.op == "next_token" and name not in caption:
                caption.append(name)
    # an output averaging classifier logits (MBT: per-modality heads, averaged at evaluation) is scored too
    scored = {c.logits: c for c in classifiers}
    for out_name, tensor in graph.outputs.items():
        node = graph.node(graph.producer[tensor])
        if isinstance(node, CallNode) and node.op == "avg":
            parts = [scored.get(outputs_by_tensor.get(i)) for i in node.inputs]
            if parts and all(parts) and len({(c.target, c.multilabel) for c in parts}) == 1:
                classifiers.insert(0, Classifier(out_name, parts[0].target, parts[0].multilabel))
    return EvalPlan(tuple(retrieval), tuple(classifiers), tuple(recon), tuple(caption))


class CompiledModel(nn.Module):
    """A model built from a spec. ``forward(**inputs)`` runs the generated code (see ``self.code``)
    and returns ``{"loss", "losses", "outputs"}`` (the contract in `avdsl.runtime.contracts`)."""

    def __init__(self, graph: Graph, modules: dict[str, nn.Module], code: str, filename: str):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.code = code
        self.inputs = input_specs(graph)
        self.eval_plan = eval_plan(graph)
        self.spec_text = graph.spec.source.resolved_text()
        self.spec_hash = graph.spec.source.hash()
        self.spec_name = graph.spec.name
        namespace = {"H": H, "L": L, "torch": torch}
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        exec(compile(code, filename, "exec"), namespace)  # the generated forward, shown by --emit code
        self._generated = namespace["forward"]

    def forward(self, **inputs):
        return self._generated(self, **inputs)


@dataclass
class Built:
    graph: Graph
    model: CompiledModel


def compile_graph(graph: Graph, device: str | torch.device | None = None) -> CompiledModel:
    """Build every module of ``graph`` (on ``device``; ``"meta"`` allocates nothing) and bind the code."""
    code = codegen.generate(graph)
    filename = f"<avdsl:{graph.spec.name}:{graph.spec.source.hash()}>"
    with torch.device(device or "cpu"):
        modules = {}
        for node in graph.nodes():
            module = _module_for(node, graph)
            if module is not None:
                modules[codegen.attr(node.id)] = module
        if str(device) != "meta":  # meta tensors hold no values: nothing to initialise
            for m in modules.values():
                E.init_linear(m)
        model = CompiledModel(graph, modules, code, filename)
    return model
