"""Information flow over the graph IR: which sources each tensor depends on, layer by layer.

A *source* is where information enters the model: an input (``Source("input", "frames")``) or a
stream's own tokens (``Source("stream", "fusion")``, which for a latent stream are learned constants and for an input stream are
its tokenized input). A tensor depends on a source when some path of reads leads from the source to
it. Inside an encoder the path follows the routing plan: in each layer a query stream takes in what
its key streams held *before* that layer (all streams update at once, as in the runtime), and every
pass starts again from the encoder's input streams. Lint rules reason about these sets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ..ir import KINDS, EncoderNode, Graph, InputNode, encoder_output, visit


class Source(NamedTuple):
    """Where information enters: an input, or a stream's own tokens."""

    kind: str  # "input" | "stream"
    name: str


@dataclass(frozen=True)
class Entry:
    """Where a source first entered a stream inside an encoder: at ``layer`` of ``pass_``, read
    through key stream ``via`` (what a lint message cites as the leak)."""

    encoder: str
    pass_: str
    layer: int
    via: str


@dataclass
class Flow:
    deps: dict = field(default_factory=dict)  # tensor name -> frozenset of `Source`
    entries: dict = field(default_factory=dict)  # (encoder output tensor, source) -> Entry
    stream_of: dict = field(default_factory=dict)  # tensor name -> the stream whose tokens it holds

    def sources_of(self, tensor: str, kind: str) -> set[str]:
        """The sources of one kind (``input`` or ``stream``) a tensor depends on, without the prefix."""
        return {s.name for s in self.deps.get(tensor, ()) if s.kind == kind}


def _input(node: InputNode, flow: Flow) -> None:
    flow.deps[node.outputs[0]] = frozenset({Source("input", node.decl.name)})


def _through(node, flow: Flow) -> None:
    """Any other node: its outputs depend on what it reads (and on its stream's own tokens)."""
    read = frozenset().union(*(flow.deps.get(t, frozenset()) for t in node.inputs))
    stream = getattr(node, "stream", None)
    if stream is not None:
        read = read | {Source("stream", stream)}
    for t in node.outputs:
        flow.deps[t] = read
        if stream is not None:
            flow.stream_of[t] = stream


def analyse_flow(graph: Graph) -> Flow:
    """Compute, for every tensor of ``graph``, the sources it depends on."""
    flow = Flow()
    rules = {**{kind: _through for kind in KINDS}, "input": _input, "encoder": _encoder}
    for node in graph.nodes():
        visit(rules, node, flow)
    return flow


def _encoder(node: EncoderNode, flow: Flow) -> None:
    """Follow the routing of each pass, layer by layer, from the encoder's input streams."""
    start = {s: flow.deps.get(t, frozenset()) for s, t in zip(node.streams + node.memory, node.inputs)}
    for pname, plan in node.plans.items():
        state = dict(start)
        entered: dict[tuple[str, str], Entry] = {}
        for li, layer in enumerate(plan.layers):
            new = dict(state)
            for a in layer.attends:
                for k in a.keys:
                    for source in state[k] - new[a.query]:
                        entered.setdefault((a.query, source), Entry(node.id, pname, li, k))
                    new[a.query] = new[a.query] | state[k]
            state = new
        for s in plan.streams():
            key = encoder_output(node.id, pname, s)
            flow.deps[key] = state[s]
            flow.stream_of[key] = s
            for (q, source), entry in entered.items():
                if q == s:
                    flow.entries[(key, source)] = entry


def reads(graph: Graph, flow: Flow, tensor: str) -> set[str]:
    """The streams an output reads directly or through other outputs (not through routing)."""
    return {flow.stream_of[t] for t in graph.upstream(tensor, stop=lambda t: t in flow.stream_of) if t in flow.stream_of}
