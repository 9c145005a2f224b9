"""The pipeline in one place: path -> loaded spec -> typed spec -> graph -> shapes -> cost (-> model).

Commands and tests call these functions; each step is its own module and pure function.
"""
from __future__ import annotations

from dataclasses import dataclass

from .build import build_graph
from .diagnostics import SpecError
from .ir import Graph
from .loader import Doc, load_file, load_text
from .passes.cost import Cost, count
from .passes.shapes import infer_shapes
from .spec import Spec, from_doc


@dataclass
class Analysis:
    """Everything known about a spec before any weight exists."""

    doc: Doc
    spec: Spec
    graph: Graph
    cost: Cost


def analyse_doc(doc: Doc) -> Analysis:
    try:
        spec = from_doc(doc)
        graph = infer_shapes(build_graph(spec))
    except SpecError as e:
        raise e.with_sources(doc.sources) from None
    return Analysis(doc, spec, graph, count(graph))


def analyse(path_or_name: str, overrides: list[str] = ()) -> Analysis:
    """Load, validate, build the graph and infer shapes and costs. Raises `SpecError` on mistakes."""
    return analyse_doc(load_file(path_or_name, list(overrides)))


def analyse_text(text: str, file: str = "<spec>", overrides: list[str] = ()) -> Analysis:
    return analyse_doc(load_text(text, file, list(overrides)))


def build_model(path_or_name: str, overrides: list[str] = (), device=None):
    """Analyse a spec and build its PyTorch model (imports the runtime)."""
    from .compiler import compile_graph

    analysis = analyse(path_or_name, overrides)
    return analysis, compile_graph(analysis.graph, device)


def verify_flow(analysis: Analysis, batch_size: int = 2, seed: int = 0):
    """Build the model and compare its measured dependences with the flow analysis (`avdsl lint
    --verify`); returns `avdsl.lint.verify.Verified`. Imports the runtime."""
    import torch

    from .compiler import compile_graph
    from .lint.flow import analyse_flow
    from .lint.verify import compare, stream_parameters
    from .runtime.flowcheck import dependence

    graph = analysis.graph
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = compile_graph(graph)
    own = stream_parameters(graph, [n for n, _ in model.named_parameters()])
    result = compare(graph, analyse_flow(graph), dependence(model, {s: p for s, p in own.items() if p}, batch_size, seed))
    result.unmeasured = sorted(s for s, p in own.items() if not p)
    return result
