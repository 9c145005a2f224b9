"""The graph IR: typed operation nodes in a networkx DiGraph whose edges carry named tensors.

Nodes are small frozen dataclasses, one class per kind of operation. A node reads tensors (by name)
and writes tensors (by name); an edge u -> v with attribute ``tensor`` says v reads what u wrote.
Passes (shapes, cost, lint, diff) are pure functions of a `Graph`; the compiler turns it into code.
Every node class names its ``kind``; a pass is a table from kind to rule, run by `visit` (no pass
tests node classes one by one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import networkx as nx

from .diagnostics import Loc
from .spec import EncoderDecl, InputDecl, Spec


@dataclass(frozen=True, kw_only=True)
class Node:
    id: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    loc: Loc
    kind: ClassVar[str] = ""

    @property
    def component(self) -> tuple[str, str]:
        """The spec component a reader recognises this node by: ``("streams", "audio")``,
        ``("encoders", "backbone")``, ``("outputs", "za")``, ``("losses", "contrastive")``, ``("inputs", "fbank")``."""
        if self.id.startswith("out."):
            return "outputs", self.id[4:].split("~")[0]
        if self.id.startswith("loss."):
            return "losses", self.id[5:].split("~")[0]
        if self.id.startswith("memory."):  # a projection of an encoder's memory: `memory.decoder.image_tokens`
            encoder, local = self.id[7:].split("~")[0].split(".", 1)
            return "encoders", f"{encoder}.memory.{local}"
        if self.kind == "encoder":
            return "encoders", self.id
        if getattr(self, "stream", None):
            return "streams", self.stream
        return "inputs", self.id


@dataclass(frozen=True, kw_only=True)
class InputNode(Node):
    kind: ClassVar[str] = "input"
    decl: InputDecl


@dataclass(frozen=True, kw_only=True)
class TokenizeNode(Node):
    kind: ClassVar[str] = "tokenize"
    stream: str
    op: str
    args: dict


@dataclass(frozen=True, kw_only=True)
class PositionNode(Node):
    kind: ClassVar[str] = "position"
    stream: str
    op: str
    args: dict


@dataclass(frozen=True, kw_only=True)
class TypeEmbedNode(Node):
    kind: ClassVar[str] = "typeembed"
    stream: str


@dataclass(frozen=True, kw_only=True)
class LatentNode(Node):
    """Learned tokens: fusion/bottleneck latents (a stream of their own) or CLS tokens prepended."""

    kind: ClassVar[str] = "latent"
    stream: str
    count: int
    prepend: bool = False  # True: prepended to the stream's tokens (CLS / aggregation)


@dataclass(frozen=True, kw_only=True)
class DropNode(Node):
    """Token dropping: ``droptoken`` (training only) or ``random_mask`` (MAE; also writes the mask)."""

    kind: ClassVar[str] = "drop"
    stream: str
    op: str
    rate: float


@dataclass(frozen=True, kw_only=True)
class FromNode(Node):
    """A stream continuing from an encoder output (projected linearly when the widths differ)."""

    kind: ClassVar[str] = "from"
    stream: str
    share: str | None = None  # another `from:` stream whose projection this one uses (no weights of its own)



@dataclass(frozen=True, kw_only=True)
class RestoreNode(Node):
    """Put masked-out positions back (as a learned mask token) in their original order."""

    kind: ClassVar[str] = "restore"
    stream: str
    masked: str  # the stream whose mask is undone
    share: str | None = None  # another `from:` stream whose mask token this one uses



@dataclass(frozen=True, kw_only=True)
class EncoderNode(Node):
    """A transformer stack over several streams, with its routing resolved per pass and layer."""

    kind: ClassVar[str] = "encoder"
    decl: EncoderDecl
    plans: dict  # pass name ("" when none) -> PassPlan
    streams: tuple[str, ...]  # stream order of ``inputs`` (then memory)
    memory: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class CallNode(Node):
    """An operator from the catalogue (pooling, projection, target, loss)."""

    kind: ClassVar[str] = "call"
    op: str
    args: dict  # non-tensor arguments, bound
    tensor_params: tuple[str, ...]  # which parameter each input tensor feeds (variadic params repeat)


@dataclass(frozen=True, kw_only=True)
class LossNode(Node):
    """A named loss: a weighted sum of loss-operator results."""

    kind: ClassVar[str] = "loss"
    name: str
    weights: tuple[float, ...]  # one per input


def encoder_output(encoder: str, pass_: str, stream: str) -> str:
    """The name of what an encoder computes for a stream: ``backbone.audio``, or ``joint.av.a`` in a pass."""
    return f"{encoder}.{pass_}.{stream}" if pass_ else f"{encoder}.{stream}"


KINDS = tuple(cls.kind for cls in Node.__subclasses__())
STREAM_KINDS = ("tokenize", "position", "typeembed", "latent", "drop", "from", "restore")  # nodes of one stream's chain


def visit(table: dict[str, Callable], node: Node, *args):
    """Run the rule for ``node.kind`` from a pass's ``table`` (kind -> rule(node, *args))."""
    return table[node.kind](node, *args)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple  # ints and symbol names
    dtype: str = "float"
    grid: tuple | None = None  # token grid (time, height, width ...) for positional encodings
    train_only_shape: tuple | None = None  # with droptoken: the eval-time shape differs


@dataclass
class Graph:
    """The dataflow graph of one spec."""

    spec: Spec
    g: nx.DiGraph = field(default_factory=nx.DiGraph)
    producer: dict = field(default_factory=dict)  # tensor name -> node id
    tensors: dict = field(default_factory=dict)  # tensor name -> TensorInfo (filled by the shape pass)
    outputs: dict = field(default_factory=dict)  # output name -> tensor name
    losses: dict = field(default_factory=dict)  # loss name -> tensor name

    def add(self, node: Node) -> Node:
        self.g.add_node(node.id, node=node)
        for t in node.outputs:
            self.producer[t] = node.id
        return node

    def connect(self) -> None:
        """Add an edge for every tensor a node reads (call after all nodes are added)."""
        for nid in list(self.g.nodes):
            for t in self.node(nid).inputs:
                if t in self.producer:
                    self.g.add_edge(self.producer[t], nid, tensor=t)

    def node(self, nid: str) -> Node:
        return self.g.nodes[nid]["node"]

    def nodes(self) -> list[Node]:
        """Nodes in a deterministic topological order (the order the generated code runs them)."""
        order = {nid: i for i, nid in enumerate(self.g.nodes)}
        return [self.node(n) for n in nx.lexicographical_topological_sort(self.g, key=lambda n: order[n])]

    def of_type(self, cls) -> list:
        return [n for n in self.nodes() if isinstance(n, cls)]

    def stream_tensor(self, stream: str) -> str | None:
        """The tensor holding a stream's tokens as they enter its first encoder (end of its embedding chain)."""
        last = None
        for node in self.nodes():
            if getattr(node, "stream", None) == stream:
                last = node.outputs[0]
        return last

    def inputs_of(self, tensor: str) -> set[str]:
        """The spec inputs a tensor depends on."""
        if tensor in self.spec.inputs:
            return {tensor}
        ancestors = nx.ancestors(self.g, self.producer[tensor])
        return {n for n in ancestors if isinstance(self.node(n), InputNode)}

    def upstream(self, tensor: str, stop: Callable[[str], bool] = lambda t: False) -> list[str]:
        """``tensor`` and the tensors it is computed from, depth first, not walking back past a tensor
        for which ``stop`` is true."""
        todo, seen, out = [tensor], set(), []
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            out.append(t)
            if not stop(t) and t in self.producer:
                todo.extend(self.node(self.producer[t]).inputs)
        return out
