"""The stream transformer: pre-norm transformer layers over several token streams, run as planned.

The routing plan says, per layer, which query stream attends to which key streams with which weights.
Execution follows the plan's block structure instead of building a dense mask:

- per weight set, the LayerNorm and the Q/K/V projection run once over every stream that set touches
  (one matmul over the concatenated tokens); a key-only stream gets only K and V, a query-only stream
  only Q, so the work is what `avdsl.passes.cost` counts;
- query streams that read the same key streams form a group: their queries are concatenated and one
  unmasked `scaled_dot_product_attention` (`attention.sdpa`) runs over exactly those keys (gathered
  once), with ``is_causal`` for a causal stream reading only itself. Work is proportional to what the routing
  allows. A boolean mask is built only where routing is finer than streams (a causal stream that
  also reads another stream);
- cross-attention is its own sub-layer over memory streams;
- a stream updated under several weight sets in one layer (MBT's bottleneck) takes the mean.

`dense_attention_reference` computes the same layer the slow way (one masked attention over all
tokens) and exists for tests and benchmarks; `use_dense_attention` makes every layer of a model run
that way (the dense-masked baseline of a whole training step: same weights, same outputs).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import sdpa


class Attend(NamedTuple):
    """One routing entry of a layer: ``query`` attends to ``keys`` with the weight set ``weights``."""

    query: str
    keys: tuple[str, ...]
    weights: str
    causal: bool = False
    cross: bool = False  # a cross-attention sub-layer (keys: memory streams or this encoder's streams)


class Norms(NamedTuple):
    """The LayerNorms of one Block that one pass uses (``Block.norms``); None where the Block has none.
    A layer gets its norms rather than the pass's name, so compiled layers of different passes share code."""

    attention: nn.Module | None
    mlp: nn.Module
    cross: nn.Module | None = None
    memory: nn.Module | None = None
    cross_mlp: nn.Module | None = None


class LayerSizes(NamedTuple):
    width: int
    depth: int
    heads: int
    mlp_dim: int


GATES = {"geglu": F.gelu, "swiglu": F.silu}  # gated MLP activations -> the function of the gate half


class Dropout(nn.Module):
    """``nn.Dropout`` whose rate is also a buffer. A lone model drops with its fixed rate
    (``F.dropout``); the members of a vectorized ensemble (`avdsl.runtime.train.ensemble`) may differ
    in rate, and there ``per_member`` makes each member drop with its own ``rate`` buffer."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.per_member = False
        self.register_buffer("rate", torch.tensor(self.p, dtype=torch.float64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.per_member:
            keep = 1 - self.rate.to(x.dtype)
            return x * (torch.rand_like(x) < keep).to(x.dtype) / keep.clamp_min(1e-12)
        return F.dropout(x, self.p, True) if self.p > 0 else x

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """The weights of one layer of one weight set. ``norm_sets`` LayerNorm pairs (one per pass when
    passes have their own norms); attention and feed-forward weights are shared by all passes. A layer
    that no pass runs self-attention in (only cross-attention) has no self-attention weights. A layer
    with cross-attention may LayerNorm its memory (``memory_norm``) and, with ``cross_mlp``, run its MLP
    only for streams that cross-attend (``with_cross``) or add a second MLP after cross-attention (``own``)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, bias: bool = True, eps: float = 1e-6,
                 activation: str = "gelu", dropout: float = 0.0, norm_sets: tuple[str, ...] = ("",),
                 cross_width: int | None = None, self_attention: bool = True, memory_norm: bool = False,
                 cross_mlp: str = "shared"):
        super().__init__()
        self.heads = heads
        self.activation = activation
        self.dense_attention = False  # the dense-masked baseline instead of the plan (`use_dense_attention`)
        # which streams run the layer's MLP: all (shared, own) or those that cross-attend (with_cross, when
        # this layer has cross-attention); `own` adds a second MLP after cross-attention for those streams
        self.cross_mlp = cross_mlp if cross_width is not None else "shared"
        if self_attention:
            self.norm1 = nn.ModuleDict({_key(p): nn.LayerNorm(width, eps=eps, bias=bias) for p in norm_sets})
            self.qkv = nn.Linear(width, 3 * width, bias=bias)
            self.proj = nn.Linear(width, width, bias=bias)
        self.norm2 = nn.ModuleDict({_key(p): nn.LayerNorm(width, eps=eps, bias=bias) for p in norm_sets})
        inner = 2 * mlp_dim if activation in GATES else mlp_dim  # a gated MLP: gate half, then value half
        self.fc1 = nn.Linear(width, inner, bias=bias)
        self.fc2 = nn.Linear(mlp_dim, width, bias=bias)
        self.drop = Dropout(dropout)
        if cross_width is not None:
            self.norm_cross = nn.ModuleDict({_key(p): nn.LayerNorm(width, eps=eps, bias=bias) for p in norm_sets})
            self.cross_q = nn.Linear(width, width, bias=bias)
            self.cross_kv = nn.Linear(cross_width, 2 * width, bias=bias)
            self.cross_proj = nn.Linear(width, width, bias=bias)
            if memory_norm:
                self.norm_memory = nn.ModuleDict({_key(p): nn.LayerNorm(cross_width, eps=eps, bias=bias) for p in norm_sets})
            if cross_mlp == "own":
                self.norm_cross_mlp = nn.ModuleDict({_key(p): nn.LayerNorm(width, eps=eps, bias=bias) for p in norm_sets})
                self.cross_fc1 = nn.Linear(width, inner, bias=bias)
                self.cross_fc2 = nn.Linear(mlp_dim, width, bias=bias)

    def norms(self, nk: str) -> Norms:
        """The LayerNorms pass ``nk`` uses in this Block."""
        def of(name):
            return getattr(self, name)[nk] if hasattr(self, name) else None
        return Norms(of("norm1"), self.norm2[nk], of("norm_cross"), of("norm_memory"), of("norm_cross_mlp"))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self._feed_forward(x, self.fc1, self.fc2)

    def _feed_forward(self, x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
        h = fc1(x)
        if self.activation in GATES:
            gate, value = h.chunk(2, dim=-1)
            h = GATES[self.activation](gate) * value
        elif self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "gelu_tanh":  # the tanh approximation (flax's nn.gelu default)
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.gelu(h)
        return self.drop(fc2(h))

    def forward(self, norms: Norms, attends: tuple["Attend", ...], x: dict) -> dict:
        """This weight set's part of one layer: self-attention, cross-attention and feed-forward
        for the query streams of ``attends`` (with the LayerNorms ``norms`` of one pass, `Block.norms`);
        returns {stream: new tokens}.
        Every layer runs this same code, so compiling it once serves all layers (regional
        compilation), and with ``fully_shard`` the layer's weights are gathered around this call."""
        selfs = [a for a in attends if not a.cross]
        crosses = [a for a in attends if a.cross]
        queries = list(dict.fromkeys(a.query for a in attends))
        h = {q: x[q] for q in queries}
        if selfs:
            attn = self.self_attention(norms, selfs, x)
            for q, y in attn.items():
                h[q] = h[q] + y
        crossing = list(dict.fromkeys(a.query for a in crosses))
        if self.cross_mlp == "own":  # self-attention -> MLP -> cross-attention -> its own MLP
            h.update(self._residual_mlp(h, queries, norms.mlp, self.fc1, self.fc2))
            for a in crosses:
                h[a.query] = h[a.query] + self.cross_attention(norms, a, h[a.query], x)
            if crossing:
                h.update(self._residual_mlp(h, crossing, norms.cross_mlp, self.cross_fc1, self.cross_fc2))
            return _contiguous(h)
        for a in crosses:
            h[a.query] = h[a.query] + self.cross_attention(norms, a, h[a.query], x)
        fed = crossing if self.cross_mlp == "with_cross" else queries  # with_cross: the MLP runs with cross-attention only
        if fed:
            h.update(self._residual_mlp(h, fed, norms.mlp, self.fc1, self.fc2))
        return _contiguous(h)

    def _residual_mlp(self, h: dict, names: list, norm: nn.Module, fc1: nn.Linear, fc2: nn.Linear) -> dict:
        """``x + MLP(norm(x))`` over the tokens of ``names`` at once (one matmul for all streams)."""
        return _over_streams(lambda t: t + self._feed_forward(norm(t), fc1, fc2), h, names)

    def self_attention(self, norms: Norms, attends: list, x: dict) -> dict:
        """Self-attention of one weight set: Q for query streams and K, V for key streams, each
        projected once; then one SDPA per group of query streams that read the same keys; then one
        output projection over every query token."""
        if self.dense_attention:
            return self.dense_self_attention(norms, attends, x)
        queries = list(dict.fromkeys(a.query for a in attends))
        keys = list(dict.fromkeys(k for a in attends for k in a.keys))
        q, k, v = _project_qkv(self, norms.attention, x, queries, keys)
        sizes = {s: x[s].shape[1] for s in queries + keys}
        groups: dict[tuple, list[str]] = {}
        for a in attends:
            groups.setdefault((a.keys, a.causal), []).append(a.query)
        order, ys = [], []
        for (group_keys, causal), qs in groups.items():
            qh = _heads(_cat([q[s] for s in qs]), self.heads)
            kh, vh = _heads(_cat([k[s] for s in group_keys]), self.heads), _heads(_cat([v[s] for s in group_keys]), self.heads)
            if causal and len(qs) == 1 and group_keys == (qs[0],):
                y = sdpa(qh, kh, vh, is_causal=True)
            elif causal:
                masks = [_prefix_causal_mask(s, group_keys, sizes, qh.device) if s in group_keys else
                         torch.ones(sizes[s], sum(sizes[k_] for k_ in group_keys), dtype=torch.bool, device=qh.device)
                         for s in qs]
                y = sdpa(qh, kh, vh, attn_mask=torch.cat(masks, dim=0))
            else:
                y = sdpa(qh, kh, vh)
            order += qs
            ys.append(_merge_heads(y))
        y = self.drop(self.proj(_cat(ys)))
        return dict(zip(order, torch.split(y, [sizes[s] for s in order], dim=1)))

    def dense_self_attention(self, norms: Norms, attends: list, x: dict) -> dict:
        """The same self-attention the dense-masked way, the baseline the plan is measured against:
        the tokens of every stream this weight set's self-attention touches, concatenated, through
        one Q/K/V projection and one SDPA with the routing's boolean mask (`routing_mask`)."""
        queries = list(dict.fromkeys(a.query for a in attends))
        touched = set(queries) | {k for a in attends for k in a.keys}
        order = tuple(s for s in x if s in touched)
        mask = routing_mask(attends, {s: x[s].shape[1] for s in order}, order, x[order[0]].device)
        y = _dense_attention(self, norms.attention, x, order, mask)
        return {q: y[q] for q in queries}

    def cross_attention(self, norms: Norms, attend: "Attend", h: torch.Tensor, x: dict) -> torch.Tensor:
        memory = torch.cat([x[k] for k in attend.keys], dim=1) if len(attend.keys) > 1 else x[attend.keys[0]]
        if norms.memory is not None:
            memory = norms.memory(memory)
        q = self.cross_q(norms.cross(h))
        k, v = self.cross_kv(memory).chunk(2, dim=-1)
        y = sdpa(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads))
        return self.drop(self.cross_proj(_merge_heads(y)))


def _key(pass_name: str) -> str:
    return pass_name or "all"


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, e = x.shape
    return x.transpose(1, 2).reshape(b, n, h * e)


def _cat(parts: list) -> torch.Tensor:
    """Concatenate along the token dim (no copy for a single part)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _contiguous(x: dict) -> dict:
    """A layer's outputs as contiguous tensors, not views into the tokens of several streams at once:
    every layer then sees inputs of one memory layout, and compiled layers (which specialise on strides)
    share one graph from the first layer on. Inside a compiled layer the copy fuses into the kernel that
    computes the output; eager layers keep their views (a copy there would only cost time)."""
    if not torch.compiler.is_compiling():
        return x
    return {s: t.contiguous() for s, t in x.items()}


def _over_streams(fn, x: dict, names: list) -> dict:
    """Apply a token-wise function once over the concatenated tokens of ``names``; split per stream."""
    y = fn(_cat([x[s] for s in names]))
    return dict(zip(names, torch.split(y, [x[s].shape[1] for s in names], dim=1)))


def _project_qkv(blk: "Block", norm: nn.Module, x: dict, queries: list, keys: list) -> tuple[dict, dict, dict]:
    """Queries, keys and values, each {stream: [B, N, D]}. Streams that are both query and key (the
    usual case) share one fused QKV matmul whose output is split in three (its backward is one cat;
    slicing would zero-fill and copy per slice); a key-only stream skips its Q and a query-only stream
    its K and V, so the work matches what the cost pass counts."""
    d = blk.proj.in_features
    w, b = blk.qkv.weight, blk.qkv.bias
    both = [s for s in queries if s in keys]
    q: dict = {}
    k: dict = {}
    v: dict = {}
    if both:
        for s, y in _over_streams(lambda t: blk.qkv(norm(t)), x, both).items():
            q[s], k[s], v[s] = y.split(d, dim=-1)
    q_only = [s for s in queries if s not in keys]
    if q_only:
        q.update(_over_streams(lambda t: F.linear(norm(t), w[:d], None if b is None else b[:d]), x, q_only))
    k_only = [s for s in keys if s not in queries]
    if k_only:
        for s, y in _over_streams(lambda t: F.linear(norm(t), w[d:], None if b is None else b[d:]), x, k_only).items():
            k[s], v[s] = y.split(d, dim=-1)
    return q, k, v


def _canonical(attends: list) -> tuple[tuple, dict]:
    """``attends`` with its streams renamed by order of appearance ("0", "1", ...), and {new name: stream}:
    a compiled layer specialises on the stream names it reads, so layers that differ only in the names
    of their streams (audio alone, video alone) then share one graph."""
    streams: dict[str, str] = {}
    for a in attends:
        for s in (a.query, *a.keys):
            streams.setdefault(s, str(len(streams)))
    call = tuple(a._replace(query=streams[a.query], keys=tuple(streams[k] for k in a.keys), weights="") for a in attends)
    return call, {c: s for s, c in streams.items()}


def _prefix_causal_mask(query: str, keys: tuple[str, ...], sizes: dict[str, int], device) -> torch.Tensor:
    """Boolean mask [Nq, Nk] for a causal stream that also reads other streams: all of the other
    streams, and its own tokens up to itself."""
    nq = sizes[query]
    cols = []
    for k in keys:
        if k == query:
            cols.append(torch.ones(nq, nq, dtype=torch.bool, device=device).tril())
        else:
            cols.append(torch.ones(nq, sizes[k], dtype=torch.bool, device=device))
    return torch.cat(cols, dim=1)


def routing_mask(attends, sizes: dict[str, int], order: tuple[str, ...], device=None) -> torch.Tensor:
    """The boolean mask [N, N] over the tokens of ``order`` (True = may attend; rows are queries) that
    the self-attention entries ``attends`` imply: the runtime's `avdsl.routing.token_mask`. A causal
    entry hides the future tokens of its own stream; a stream no entry updates sees only itself."""
    starts, total = {}, 0
    for s in order:
        starts[s] = total
        total += sizes[s]
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    for a in attends:
        q0, nq = starts[a.query], sizes[a.query]
        for k in a.keys:
            block = torch.ones(nq, sizes[k], dtype=torch.bool, device=device)
            mask[q0:q0 + nq, starts[k]:starts[k] + sizes[k]] |= block.tril() if a.causal and k == a.query else block
    for s in order:
        if all(a.query != s for a in attends):
            mask[starts[s]:starts[s] + sizes[s], starts[s]:starts[s] + sizes[s]] = torch.eye(sizes[s], dtype=torch.bool, device=device)
    return mask


def use_dense_attention(model: nn.Module, dense: bool = True) -> nn.Module:
    """Make every encoder layer in ``model`` run its self-attention dense-masked
    (`Block.dense_self_attention`) instead of as planned, or back with ``dense=False``. The weights
    and outputs stay the same (within rounding); this is the baseline for benchmarks and tests."""
    for module in model.modules():
        if isinstance(module, Block):
            module.dense_attention = dense
    return model


class StreamTransformer(nn.Module):
    """A transformer stack over named streams, executing a routing plan per pass.

    ``plans``: {pass name: [layer -> tuple of `Attend`]}. ``sizes``: {weight set: `LayerSizes`}.
    ``forward(**streams)`` returns {"stream"} or {"pass.stream"} -> tokens for every stream a pass updates;
    streams whose names cannot be keywords (``class``) come in a dict as the first argument.
    """

    def __init__(self, plans: dict, sizes: dict, *, memory_widths: dict | None = None, norms: str = "shared",
                 final_norm: bool = True, bias: bool = True, eps: float = 1e-6, activation: str = "gelu",
                 dropout: float = 0.0, pre_norm: bool = False, memory_norm: bool = False, cross_mlp: str = "shared"):
        super().__init__()
        self.plans = {p: [tuple(Attend(*a) for a in layer) for layer in layers] for p, layers in plans.items()}
        norm_sets = tuple(plans) if norms == "per_pass" else ("",)
        self.norm_of = {p: _key(p if norms == "per_pass" else "") for p in plans}
        memory_widths = memory_widths or {}
        self.blocks = nn.ModuleDict()
        sizes = {ws: LayerSizes(*size) for ws, size in sizes.items()}
        for ws, (width, depth, heads, mlp_dim) in sizes.items():
            layers = []
            for li in range(depth):
                here = [a for layers_ in self.plans.values() if li < len(layers_) for a in layers_[li] if a.weights == ws]
                cross = [a for a in here if a.cross]
                cross_width = memory_widths[cross[0].keys[0]] if cross else None
                layers.append(Block(width, heads, mlp_dim, bias=bias, eps=eps, activation=activation, dropout=dropout,
                                    norm_sets=norm_sets, cross_width=cross_width,
                                    self_attention=not cross or any(not a.cross for a in here),
                                    memory_norm=memory_norm, cross_mlp=cross_mlp))
            self.blocks[ws] = nn.ModuleList(layers)
        # final LayerNorms: one per weight set, or with ``final_norm="shared"`` one for every stream (MBT)
        self.final = nn.ModuleDict()
        self.shared_final = final_norm == "shared"
        if self.shared_final:
            width = next(iter(sizes.values())).width
            self.final["shared"] = nn.ModuleDict({_key(p): nn.LayerNorm(width, eps=eps, bias=bias) for p in norm_sets})
        elif final_norm:
            for ws, size in sizes.items():
                self.final[ws] = nn.ModuleDict({_key(p): nn.LayerNorm(size.width, eps=eps, bias=bias) for p in norm_sets})
        # per pass, the streams it updates; with ``kept`` a dict (see `avdsl.compiler.keep`), forward
        # stores each of them after every layer under "pass.stream@layer" ("stream@layer" without passes)
        self.updates = {p: tuple(dict.fromkeys(a.query for layer in layers for a in layer)) for p, layers in self.plans.items()}
        self.kept: dict | None = None
        # which weight set's final norm applies to a stream: the last one that updated it; its pre-norm: the first
        self.final_of, self.first_of = {}, {}
        for p, layers in self.plans.items():
            for layer in layers:
                for a in layer:
                    self.final_of[(p, a.query)] = a.weights
                    self.first_of.setdefault((p, a.query), a.weights)
        # LayerNorms before the first layer (CLIP's `ln_pre`): one per weight set
        self.pre = nn.ModuleDict()
        if pre_norm:
            for ws, size in sizes.items():
                self.pre[ws] = nn.ModuleDict({_key(p): nn.LayerNorm(size.width, eps=eps, bias=bias) for p in norm_sets})

    def forward(self, unnamed: dict | None = None, /, **streams: torch.Tensor) -> dict[str, torch.Tensor]:
        if unnamed:
            streams = {**unnamed, **streams}
        out: dict[str, torch.Tensor] = {}
        for pname, layers in self.plans.items():
            # contiguous inputs (tokenizers may return transposed views): the first layer of a pass then
            # reads the same memory layout as the layers after it (see `_contiguous`)
            x = {s: t.contiguous() for s, t in streams.items()}
            if len(self.pre):
                for (p, s), ws in self.first_of.items():
                    if p == pname:
                        x[s] = self.pre[ws][self.norm_of[pname]](x[s])
            updated: dict[str, None] = {}
            for li, layer in enumerate(layers):
                x = self.layer(pname, li, layer, x)
                for a in layer:
                    updated.setdefault(a.query)
                if self.kept is not None:
                    self.kept.update({f"{pname}.{s}@{li}" if pname else f"{s}@{li}": x[s] for s in self.updates[pname]})
            nk = self.norm_of[pname]
            for s in updated:
                y = x[s]
                if len(self.final):
                    y = self.final["shared" if self.shared_final else self.final_of[(pname, s)]][nk](y)
                out[f"{pname}.{s}" if pname else s] = y
        return out

    def layer(self, pname: str, li: int, layer: tuple, x: dict) -> dict:
        """One layer of one pass: every weight set's block over the streams it touches."""
        nk = self.norm_of[pname]
        by_ws: dict[str, list] = {}
        for a in layer:
            by_ws.setdefault(a.weights, []).append(a)
        updates: dict[str, list[torch.Tensor]] = {}
        for ws, attends in by_ws.items():
            blk = self.blocks[ws][li]
            call, streams = _canonical(attends)
            xs = {c: x[s] for c, s in streams.items()}
            # a layer over one stream: one graph for every token count (128 audio, 49 video tokens: see
            # `_canonical`). A layer over several streams keeps static token counts: with symbolic ones
            # inductor cannot prove the concatenated tokens contiguous and copies them around every
            # element-wise kernel (CAV-MAE's decoder: 2x the memory traffic of its GELU and norms), and
            # such a layer repeats with the same counts anyway. A whole-model compile traces this
            # method: no marks then.
            if len(xs) == 1 and not torch.compiler.is_compiling():
                # the mark stays on the tensor it is put on: mark an alias, so that a later multi-stream
                # call on the same tokens (CAV-MAE's audio+video pass after audio alone) stays static
                (c, t), = xs.items()
                xs = {c: t.view_as(t)}
                # no torch.compiler equivalent in 2.11; torch's dynamic-shapes docs use this one
                torch._dynamo.maybe_mark_dynamic(xs[c], 1)  # private API: see the line above
            for c, y in blk(blk.norms(nk), call, xs).items():
                updates.setdefault(streams[c], []).append(y)
        new = dict(x)
        for q, ys in updates.items():
            new[q] = ys[0] if len(ys) == 1 else torch.stack(ys, dim=0).mean(dim=0)
        return new

    def self_attention(self, blk: Block, nk: str, attends: list, x: dict) -> dict:
        """See :meth:`Block.self_attention` (kept here for the benchmarks and tests)."""
        return blk.self_attention(blk.norms(nk), attends, x)

    def cross_attention(self, blk: Block, nk: str, attend: Attend, h: torch.Tensor, x: dict) -> torch.Tensor:
        """See :meth:`Block.cross_attention`."""
        return blk.cross_attention(blk.norms(nk), attend, h, x)


def dense_attention_reference(blk: Block, nk: str, streams: dict, order: tuple, mask: torch.Tensor) -> dict:
    """Self-attention of one shared-weight layer the slow way: all tokens, one boolean mask
    [N, N] (True = may attend). Returns the attention outputs per stream (after the layer's dropout,
    before the residual)."""
    return _dense_attention(blk, blk.norm1[nk], streams, order, mask)


def _dense_attention(blk: Block, norm: nn.Module, streams: dict, order: tuple, mask: torch.Tensor) -> dict:
    sizes = [streams[s].shape[1] for s in order]
    cat = torch.cat([streams[s] for s in order], dim=1)
    q, k, v = blk.qkv(norm(cat)).chunk(3, dim=-1)
    y = sdpa(_heads(q, blk.heads), _heads(k, blk.heads), _heads(v, blk.heads), attn_mask=mask)
    y = blk.drop(blk.proj(_merge_heads(y)))
    return dict(zip(order, torch.split(y, sizes, dim=1)))
