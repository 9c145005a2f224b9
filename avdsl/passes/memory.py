"""Memory a spec's model would need, estimated from shapes alone, so that what cannot fit is refused
before a single weight is allocated.

The estimate is deliberately simple and errs high: fp32 parameters (plus gradients and two AdamW
moments when training), and the activations of one batch: every tensor of the graph, and inside each
encoder layer the tokens it updates (residuals, Q/K/V, the attention output and the feed-forward inner
width), plus the attention scores of one layer (one per head and query-key pair; they are transient).
Training keeps every layer's activations for the backward pass; inference needs the largest layer.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from ..diagnostics import SpecError
from ..ir import EncoderNode, Graph
from .cost import Cost, _n
from .shapes import weight_sets

BYTES = 4  # fp32
TRAINING_BYTES_PER_PARAM = 16  # weights, gradients, AdamW's two moments


@dataclass(frozen=True)
class MemoryEstimate:
    params: int  # parameter count
    batch: int
    weights_bytes: int  # parameters (and optimizer state when training)
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.weights_bytes + self.activation_bytes


def _layer_activations(node: EncoderNode, graph: Graph) -> list[tuple[int, int]]:
    """Per layer (over all passes), the activation elements of one sample that a layer keeps, and
    those of its attention scores (transient: at most one layer's exist at a time)."""
    sets = weight_sets(node)
    stream_in = dict(zip(node.streams + node.memory, node.inputs))
    tokens = {s: _n(graph.tensors[stream_in[s]].shape[1]) for s in stream_in}
    out = []
    for plan in node.plans.values():
        for layer in plan.layers:
            kept = scores = 0
            for a in layer.attends:
                size = sets[a.weights].sizes
                n_q, n_k = tokens[a.query], sum(tokens[k] for k in a.keys)
                kept += n_q * (6 * size.width + 2 * size.mlp_dim) + 2 * size.width * n_k
                scores += size.heads * n_q * n_k
            out.append((kept, scores))
    return out


def estimate(graph: Graph, cost: Cost, batch: int, training: bool) -> MemoryEstimate:
    """The memory the model of ``graph`` needs for a batch of ``batch`` (training or inference)."""
    params = cost.total_params
    tensors = sum(_n_elements(info.shape[1:]) for info in graph.tensors.values() if info.shape)
    layers = [n for node in graph.of_type(EncoderNode) for n in _layer_activations(node, graph)]
    scores = max((s for _, s in layers), default=0)
    inside = (sum(k for k, _ in layers) if training else max((k for k, _ in layers), default=0)) + scores
    weights = params * (TRAINING_BYTES_PER_PARAM if training else BYTES)
    return MemoryEstimate(params, batch, weights, batch * (tensors + inside) * BYTES)


def _n_elements(dims) -> int:
    out = 1
    for d in dims:
        out *= _n(d)
    return out


def host_memory() -> int:
    """Bytes this process may use on the host: physical memory, or a lower address-space limit."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        physical = 1 << 62
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return min(physical, soft) if soft != resource.RLIM_INFINITY else physical


def gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 / 10 else f"{n / 1024**2:.0f} MiB"


def check_fits(graph: Graph, cost: Cost, batch: int, training: bool, available: int, where: str = "this machine") -> MemoryEstimate:
    """Raise a `SpecError` when the estimate exceeds ``available`` bytes; return the estimate."""
    est = estimate(graph, cost, batch, training)
    if est.total > available:
        what = "train" if training else "build"
        raise SpecError(graph.spec.loc(), f"this model would need about {gib(est.total)} to {what} "
                        f"({est.params:,} parameters: {gib(est.weights_bytes)}; activations at batch {batch}: "
                        f"{gib(est.activation_bytes)}), more than the {gib(available)} of {where}",
                        "use fewer layers, a smaller width, fewer tokens (larger patches, shorter inputs) or a smaller batch")
    return est
