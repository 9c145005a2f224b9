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

from ..ir import KINDS, CallNode, EncoderNode, Graph, InputNode, encoder_output, visit
from ..ops import OPS


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
    query: str = ""


@dataclass
class Flow:
    deps: dict = field(default_factory=dict)  # tensor name -> frozenset of `Source`
    entries: dict = field(default_factory=dict)  # (encoder output tensor, source) -> Entry
    stream_of: dict = field(default_factory=dict)  # tensor name -> the stream whose tokens it holds
    rows: dict = field(default_factory=dict)  # tensor name -> sources of each row, where rows differ (`OpDef.rows`)

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


def _call(node: CallNode, flow: Flow) -> None:
    """An operator call: what it reads, or per row for operators whose rows read different tensors."""
    rule = OPS[node.op].rows if node.op in OPS else None
    if rule is None:
        _through(node, flow)
        return
    sources, rows = rule(node.args, [flow.deps.get(t, frozenset()) for t in node.inputs], [flow.rows.get(t) for t in node.inputs])
    flow.deps[node.outputs[0]] = sources
    if rows is not None:
        flow.rows[node.outputs[0]] = rows


def analyse_flow(graph: Graph) -> Flow:
    """Compute, for every tensor of ``graph``, the sources it depends on."""
    flow = Flow()
    rules = {**{kind: _through for kind in KINDS}, "input": _input, "encoder": _encoder, "call": _call}
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


@dataclass(frozen=True)
class Sight:
    """How a tensor sees one text input, position by position: ``aligned`` when its tokens are that
    input's tokens in order (the text stream and what is computed token-wise from it), ``leak`` the
    first place where a position came to see later tokens of the input (None: causal so far)."""

    aligned: bool = False
    leak: Entry | None = None


def future_sight(graph: Graph, flow: Flow, text_input: str) -> dict[str, Sight]:
    """For every tensor, whether some position of it can see tokens of ``text_input`` that come after
    it. A position sees later tokens when a stream aligned with the text attends to itself without
    `(causal)`, or any stream reads another stream (or memory) that depends on the text at all (that
    stream has mixed every position). This is what a next-token loss must not allow."""
    source = Source("input", text_input)
    sight: dict[str, Sight] = {}
    for node in graph.nodes():
        if isinstance(node, InputNode):
            sight[node.outputs[0]] = Sight(aligned=node.decl.name == text_input)
        elif isinstance(node, EncoderNode):
            _encoder_sight(node, flow, source, sight)
        else:
            ins = [sight.get(t, Sight()) for t in node.inputs]
            leak = next((s.leak for s in ins if s.leak), None)
            for t in node.outputs:
                sight[t] = Sight(any(s.aligned for s in ins), leak)
    return sight


def _encoder_sight(node: EncoderNode, flow: Flow, source: str, sight: dict) -> None:
    names = node.streams + node.memory
    start = {s: sight.get(t, Sight()) for s, t in zip(names, node.inputs)}
    deps0 = {s: flow.deps.get(t, frozenset()) for s, t in zip(names, node.inputs)}
    for pname, plan in node.plans.items():
        state, deps = dict(start), dict(deps0)
        for li, layer in enumerate(plan.layers):
            new, new_deps = dict(state), dict(deps)
            for a in layer.attends:
                for k in a.keys:
                    new_deps[a.query] = new_deps[a.query] | deps[k]
                cur = new[a.query]
                if not cur.aligned or cur.leak is not None:
                    new[a.query] = cur  # only a stream aligned with the text can see its later tokens
                    continue
                for k in a.keys:
                    # reading itself sees later tokens unless causal (cross-attention has no causal mask);
                    # reading any other stream that depends on the text sees all of it
                    own = k == a.query and state[k].aligned and (a.cross or not a.causal)
                    leak = state[k].leak or (Entry(node.id, pname, li, k, a.query) if own or (
                        k != a.query and source in deps[k]) else None)
                    if leak is not None:
                        cur = Sight(True, leak)
                        break
                new[a.query] = cur
            state, deps = new, new_deps
        for s in plan.streams():
            sight[encoder_output(node.id, pname, s)] = state[s]
