"""`avdsl lint --verify`: the information-flow analysis checked against the built model.

`analyse_flow` says from the routing which sources (inputs, streams) each output and loss depends
on; the lint rules about leaks and dead streams trust it. Here the model is built and the same
question is answered numerically (`avdsl.runtime.flowcheck`, torch.func vector-Jacobian products),
and every disagreement is a finding: a dependence the analysis forbids but the model has (a bug in
the planner or the runtime lets information through), or one the analysis allows but the model
lacks. This module compares (no torch); `avdsl.api.verify_flow` builds the model and measures.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..codegen import attr_names
from ..ir import Graph
from .flow import Flow, Source


@dataclass(frozen=True)
class Mismatch:
    target: str  # output:NAME or loss:NAME
    source: str  # input:NAME or stream:NAME
    static: bool  # what the analysis says
    measured: bool  # what the model does

    def __str__(self) -> str:
        if self.measured:
            return f"{self.target} depends on {self.source} in the built model, but the routing forbids it"
        return f"{self.target} should depend on {self.source} by the routing, but does not in the built model"


@dataclass
class Verified:
    """The comparison for one spec: pairs checked, mismatches, sources that could not be measured."""

    checked: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    unmeasured: list[str] = field(default_factory=list)  # streams with no parameters of their own


def stream_parameters(graph: Graph, parameter_names: list[str]) -> dict[str, list[str]]:
    """For each stream, the parameters of the modules only its own nodes run (tokenizer, positions,
    latent tokens, projections); a module that several streams share (``share:``) counts for none."""
    attrs = attr_names(graph)
    users: dict[str, set[str]] = {}
    for node in graph.nodes():
        stream = getattr(node, "stream", None)
        if stream is not None:
            share = getattr(node, "share", None)  # runs the same step's module of the stream it shares (as codegen does)
            users.setdefault(attrs[f"{share}/{node.id.split('/', 1)[1]}" if share else node.id], set()).add(stream)
    out: dict[str, list[str]] = {s: [] for s in graph.spec.streams}
    for attr, streams in users.items():
        if len(streams) == 1:
            (stream,) = streams
            out[stream] += [n for n in parameter_names if n.startswith(attr + ".")]
    return out


def expected(graph: Graph, flow: Flow, target: str, source: str) -> bool:
    """What the static analysis says about one (target, source) pair."""
    kind, name = target.split(":", 1)
    tensor = graph.outputs.get(name) if kind == "output" else graph.losses.get(name)
    return Source(*source.split(":", 1)) in flow.deps.get(tensor, frozenset())


def compare(graph: Graph, flow: Flow, measured: dict[str, dict[str, bool]]) -> Verified:
    result = Verified()
    for target, sources in measured.items():
        for source, depends in sources.items():
            result.checked += 1
            static = expected(graph, flow, target, source)
            if static != depends:
                result.mismatches.append(Mismatch(target, source, static, depends))
    return result
