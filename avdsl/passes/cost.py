"""Parameter and FLOP accounting, from shapes alone (no weights are built).

Parameters are counted per node and grouped by spec component; frozen parameters (fixed sin-cos
tables, frozen embeddings) are counted separately. FLOPs are for one forward pass of one sample
(2 per multiply-add) and count only the attention pairs the routing allows, so the number is the
work the planned attention actually does. Tests check the counts against the built PyTorch modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import ops
from ..ir import CallNode, EncoderNode, FromNode, Graph, PositionNode, TokenizeNode, visit
from ..ops import size_of as _n
from .shapes import call_bound, weight_sets


@dataclass
class Cost:
    params: dict = field(default_factory=dict)  # node id -> trainable + frozen parameters
    frozen: dict = field(default_factory=dict)  # node id -> frozen parameters
    flops: dict = field(default_factory=dict)  # node id -> forward FLOPs per sample
    attention_flops: dict = field(default_factory=dict)  # "encoder/pass/layer/query" -> FLOPs per sample

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_frozen(self) -> int:
        return sum(self.frozen.values())

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())


GATED = ("geglu", "swiglu")  # activations of a gated MLP: its first linear has 2 x mlp_dim outputs


def layer_params(width: int, mlp_dim: int, bias: bool, activation: str, norms: int) -> int:
    """One pre-norm transformer layer: two LayerNorms (times ``norms`` sets), attention, feed-forward."""
    ln = (2 if bias else 1) * width
    attn = 4 * width * width + (4 * width if bias else 0)
    return 2 * ln * norms + attn + mlp_params(width, mlp_dim, bias, activation)


def mlp_params(width: int, mlp_dim: int, bias: bool, activation: str) -> int:
    """The feed-forward of a layer: two linears (the first twice as wide for a gated activation)."""
    inner = 2 * mlp_dim if activation in GATED else mlp_dim
    return width * inner + mlp_dim * width + ((inner + width) if bias else 0)


def self_attention_params(width: int, bias: bool, norms: int) -> int:
    """The self-attention part of `layer_params`: its LayerNorm (per norm set), Q/K/V and output projection."""
    return (2 if bias else 1) * width * norms + 4 * width * width + (4 * width if bias else 0)


def cross_params(width: int, memory_width: int, bias: bool, norms: int) -> int:
    ln = (2 if bias else 1) * width
    return ln * norms + 2 * width * width + 2 * memory_width * width + (4 * width if bias else 0)


def weight_set_params(node: EncoderNode, graph: Graph) -> dict[str, int]:
    """Parameters of each weight set of an encoder (its layers and final norm), so a per-stream
    encoder's count can be read per modality. A ``final_norm: shared`` LayerNorm is its own entry."""
    enc = node.decl
    norms = len(node.plans) if enc.norms == "per_pass" else 1
    stream_in = dict(zip(node.streams + node.memory, node.inputs))
    out: dict[str, int] = {}
    sets = weight_sets(node)
    for ws in sets.values():
        s = ws.sizes
        total = s.depth * layer_params(s.width, s.mlp_dim, enc.bias, enc.activation, norms)
        ln = (2 if enc.bias else 1) * norms
        if enc.final_norm is True:
            total += ln * s.width
        if enc.pre_norm:
            total += ln * s.width
        for layer in range(s.depth):
            here = [a for plan in node.plans.values() if layer < len(plan.layers)
                    for a in plan.layers[layer].attends if a.weights == ws.name]
            crossing = [a for a in here if a.cross]
            if crossing:
                mem_width = graph.tensors[stream_in[crossing[0].keys[0]]].shape[-1]
                total += cross_params(s.width, mem_width, enc.bias, norms)
                if enc.memory_norm:
                    total += ln * mem_width
                if enc.cross_mlp == "own":  # a second LayerNorm and MLP after cross-attention
                    total += ln * s.width + mlp_params(s.width, s.mlp_dim, enc.bias, enc.activation)
                if all(a.cross for a in here):  # a cross-attention-only layer has no self-attention weights
                    total -= self_attention_params(s.width, enc.bias, norms)
        out[ws.name] = total
    if enc.final_norm == "shared":
        width = next(iter(sets.values())).sizes.width
        out["final_norm"] = (2 if enc.bias else 1) * width * norms
    return out


def encoder_params(node: EncoderNode, graph: Graph) -> int:
    return sum(weight_set_params(node, graph).values())


def encoder_flops(node: EncoderNode, graph: Graph, cost: Cost) -> int:
    """Forward FLOPs per sample of an encoder as planned: projections for the tokens each weight set
    touches, attention over allowed pairs only, and the feed-forward of every updated token."""
    enc = node.decl
    sets = weight_sets(node)
    stream_in = dict(zip(node.streams + node.memory, node.inputs))
    count = {s: _n(graph.tensors[stream_in[s]].shape[1]) for s in stream_in}
    crossed = {(a.weights, li) for plan in node.plans.values() for li, layer in enumerate(plan.layers)
               for a in layer.attends if a.cross}  # (weight set, layer) with cross-attention weights
    total = 0
    for pname, plan in node.plans.items():
        for li, layer in enumerate(plan.layers):
            by_ws: dict[str, list] = {}
            for a in layer.attends:
                by_ws.setdefault(a.weights, []).append(a)
            for wname, attends in by_ws.items():
                d = sets[wname].sizes.width
                m = sets[wname].sizes.mlp_dim
                inner = 2 * m if enc.activation in GATED else m
                selfs = [a for a in attends if not a.cross]
                queries = {a.query for a in attends}
                kv_tokens = {k for a in selfs for k in a.keys}
                q_tokens = sum(count[q] for q in {a.query for a in selfs})
                total += 2 * d * d * q_tokens + 4 * d * d * sum(count[k] for k in kv_tokens)  # Q, K, V
                total += 2 * d * d * q_tokens  # output projection
                for a in attends:
                    nq = count[a.query]
                    pairs = 0
                    for k in a.keys:
                        nk = count[k]
                        pairs += nq * (nq + 1) // 2 if (a.causal and k == a.query) else nq * nk
                    f = 4 * pairs * d
                    if a.cross:
                        mem = sum(count[k] for k in a.keys)
                        mem_w = graph.tensors[stream_in[a.keys[0]]].shape[-1]
                        f += 4 * d * d * nq + 4 * mem_w * d * mem
                    cost.attention_flops[f"{enc.name}/{pname or '-'}/{li}/{a.query}/{wname}"] = 4 * pairs * d
                    total += f
                crossing = {a.query for a in attends if a.cross}
                fed = crossing if enc.cross_mlp == "with_cross" and (wname, li) in crossed else queries
                if enc.cross_mlp == "own":
                    fed_tokens = sum(count[q] for q in queries) + sum(count[q] for q in crossing)
                else:
                    fed_tokens = sum(count[q] for q in fed)
                total += 2 * (d * inner + m * d) * fed_tokens
    return total


def _op_cost(op: ops.OpDef, node, graph: Graph, **facts) -> ops.OpCost:
    """The cost of a stream operator (tokenizer, position) on the tokens or input ``x`` it reads."""
    b = ops.bound_for(op, {**node.args, "x": graph.tensors[node.inputs[0]].shape}, **facts)
    return op.cost(b) if op.cost else ops.OpCost()


def _tokenize(node: TokenizeNode, graph: Graph, cost: Cost) -> ops.OpCost:
    out = graph.tensors[node.outputs[0]]
    return _op_cost(ops.OPS[node.op], node, graph, kind=graph.spec.inputs[node.inputs[0]].kind, width=out.shape[2], out=out.shape)


def _position(node: PositionNode, graph: Graph, cost: Cost) -> ops.OpCost:
    x = graph.tensors[node.inputs[0]]
    return _op_cost(ops.OPS[node.op], node, graph, grid=x.grid, width=x.shape[2])


def _from(node: FromNode, graph: Graph, cost: Cost) -> ops.OpCost:
    w_in, w_out = graph.tensors[node.inputs[0]].shape[2], graph.tensors[node.outputs[0]].shape[2]
    if w_in == w_out:
        return ops.OpCost()
    return ops.OpCost(0 if node.share else w_in * w_out + w_out, 0, 2 * _n(graph.tensors[node.inputs[0]].shape[1]) * w_in * w_out)


def _call(node: CallNode, graph: Graph, cost: Cost) -> ops.OpCost:
    op = ops.OPS[node.op]
    return op.cost(call_bound(node, graph)) if op.cost else ops.OpCost()


RULES = {
    "input": lambda node, graph, cost: ops.OpCost(),
    "tokenize": _tokenize,
    "position": _position,
    "typeembed": lambda node, graph, cost: ops.OpCost(graph.tensors[node.inputs[0]].shape[2]),
    "latent": lambda node, graph, cost: ops.OpCost(node.count * graph.tensors[node.outputs[0]].shape[2]),
    "drop": lambda node, graph, cost: (ops.OPS[node.op].cost(ops.bound_for(ops.OPS[node.op], {"x": graph.tensors[node.inputs[0]].shape}))
                                       if ops.OPS[node.op].cost else ops.OpCost()),
    # the mask token (counted once when shared)
    "restore": lambda node, graph, cost: ops.OpCost(0 if node.share else graph.tensors[node.outputs[0]].shape[2]),
    "from": _from,
    "encoder": lambda node, graph, cost: ops.OpCost(encoder_params(node, graph), 0, encoder_flops(node, graph, cost)),
    "call": _call,
    "loss": lambda node, graph, cost: ops.OpCost(),
}


def count(graph: Graph) -> Cost:
    """Parameters (per node, frozen apart) and forward FLOPs per sample for the whole graph."""
    cost = Cost()
    for node in graph.nodes():
        c = visit(RULES, node, graph, cost)
        cost.params[node.id] = c.params
        cost.frozen[node.id] = c.frozen
        cost.flops[node.id] = c.flops
    return cost


def by_component(graph: Graph, per_node: dict[str, int]) -> dict[str, int]:
    """A per-node count (``cost.params``, ``cost.flops``) summed per component."""
    out: dict[str, int] = {}
    for nid, value in per_node.items():
        key = ".".join(graph.node(nid).component)
        out[key] = out.get(key, 0) + value
    return {k: v for k, v in out.items() if v}
