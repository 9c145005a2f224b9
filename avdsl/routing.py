"""Routing rules -> a plan per layer: who attends to whom, with which weights.

A rule ``q1, q2 <- k1, k2 [via W] [(causal|cross)] [@ a..b:s]`` says that, in the layers it covers,
the tokens of each query stream attend to the tokens of the key streams, computed with the weights of
``W`` (by default the query stream's own weights, or the shared ones). For each layer, the last rule
that covers a (query stream, weights, kind) wins; earlier ones are *shadowed* there (a lint finding).
A stream that no rule covers in a layer passes through that layer unchanged. A stream updated under
several weight sets in one layer (MBT's bottleneck, ``via audio`` and ``via video``) gets the mean of
its updates.

The plan is block-structured by stream by construction, which is what lets the runtime run one
unmasked attention per group of query streams instead of one big masked one.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import expr as ex
from .diagnostics import Loc, SpecError, did_you_mean
from .limits import MAX_LAYER_STREAMS, MAX_ROUTING_ENTRIES, MAX_ROUTING_RULES, MAX_RULE_SET_NESTING

FLAGS = ("causal", "cross")


@dataclass(frozen=True)
class Attend:
    """In one layer: ``query`` attends to ``keys`` using the weights of ``weights``."""

    query: str
    keys: tuple[str, ...]
    weights: str
    causal: bool = False
    cross: bool = False  # a cross-attention sub-layer (keys are memory streams)
    loc: Loc | None = None


@dataclass(frozen=True)
class LayerPlan:
    attends: tuple[Attend, ...]

    def self_attends(self) -> tuple[Attend, ...]:
        return tuple(a for a in self.attends if not a.cross)

    def cross_attends(self) -> tuple[Attend, ...]:
        return tuple(a for a in self.attends if a.cross)

    def updated(self) -> tuple[str, ...]:
        """Streams this layer changes, in first-mention order."""
        seen: dict[str, None] = {}
        for a in self.attends:
            seen.setdefault(a.query)
        return tuple(seen)

    def sees(self) -> dict[str, set[str]]:
        """Stream-level visibility: query stream -> every key stream it reads in this layer."""
        out: dict[str, set[str]] = {}
        for a in self.attends:
            out.setdefault(a.query, set()).update(a.keys)
        return out


@dataclass(frozen=True)
class Shadowed:
    """A rule that some later rule overrides in every layer it covers (lint: routing R203)."""

    rule_loc: Loc
    by_loc: Loc
    query: str


@dataclass(frozen=True)
class PassPlan:
    name: str
    layers: tuple[LayerPlan, ...]
    shadowed: tuple[Shadowed, ...] = ()

    def streams(self) -> tuple[str, ...]:
        """Streams this pass computes (updated in at least one layer), in first-mention order."""
        seen: dict[str, None] = {}
        for layer in self.layers:
            for s in layer.updated():
                seen.setdefault(s)
        return tuple(seen)

    def ranges(self) -> list[tuple[int, int, LayerPlan]]:
        """Consecutive layers with identical plans, as (start, stop, plan): the routing table."""
        out: list[tuple[int, int, LayerPlan]] = []
        for i, layer in enumerate(self.layers):
            key = _strip(layer)
            if out and _strip(out[-1][2]) == key:
                out[-1] = (out[-1][0], i + 1, out[-1][2])
            else:
                out.append((i, i + 1, layer))
        return out


def _strip(layer: LayerPlan):
    return tuple((a.query, a.keys, a.weights, a.causal, a.cross) for a in layer.attends)


def _bound(value, vars: dict, loc: Loc, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, int):
        return value
    if value not in vars:
        raise SpecError(loc, f"'{value}' in a layer range is not a var", did_you_mean(value, vars, "a var") or
                        f"declare it under `vars:`, e.g. `vars: {{{value}: 8}}`")
    v = vars[value]
    if not isinstance(v, int) or isinstance(v, bool):
        raise SpecError(loc, f"var '{value}' is {v!r}; a layer bound must be a whole number", "set it to an integer")
    return v


def layers_of(rng: ex.Range | None, depth: int, vars: dict, loc: Loc) -> range:
    """The layers a range covers. Negative bounds count from the end, as in Python. An open range
    starting at the depth (``@ 12..`` in a 12-layer encoder) covers no layer: that is how a var such as
    MBT's fusion layer switches a rule set off (late fusion)."""
    if rng is None:
        return range(depth)
    at = loc.shifted(rng.col)
    start = _bound(rng.start, vars, at, 0)
    stop = start + 1 if rng.single else _bound(rng.stop, vars, at, depth)
    start, stop = (start + depth if start < 0 else start), (stop + depth if stop < 0 else stop)
    if rng.step < 1:
        raise SpecError(at, f"the layer step must be at least 1, got {rng.step}", "e.g. `@ 1..:2` for every other layer")
    if not rng.single and rng.stop is None and start == depth:
        return range(depth, depth)
    if not 0 <= start < depth or not start < stop <= depth:
        raise SpecError(at, f"layer range {start}..{stop} does not fit an encoder of depth {depth}",
                        f"layers are numbered 0..{depth} (half-open, like Python); e.g. `@ 0..{depth}`")
    return range(start, stop, rng.step)


def expand_uses(entries, rule_sets: dict, vars: dict, depth: int, outer: range | None = None, using: tuple = (),
                budget: list | None = None):
    """Flatten ``use NAME @ range`` into (Rule, Loc, layers) triples, intersecting nested ranges.
    ``using`` is the chain of rule sets being expanded (a name in it again is a loop); the rules
    produced are counted against MAX_ROUTING_RULES as they are made, so nested sets cannot blow up."""
    budget = [MAX_ROUTING_RULES] if budget is None else budget
    out = []
    for node, loc in entries:
        covered = layers_of(node.range, depth, vars, loc)
        if outer is not None:
            covered = [i for i in covered if i in outer]
        if isinstance(node, ex.Use):
            name = node.name
            if name in vars and isinstance(vars[name], str):
                name = vars[name]  # `use fusion` where vars.fusion names the rule set
            if name not in rule_sets:
                raise SpecError(loc.shifted(node.col), f"no rule set named '{name}'",
                                did_you_mean(name, list(rule_sets), "a rule set") or "declare it under `rule_sets:`")
            if name in using:
                chain = " -> ".join(using[using.index(name):] + (name,))
                raise SpecError(loc.shifted(node.col), f"rule sets use each other in a loop: {chain}",
                                "a rule set may `use` another, but not itself")
            if len(using) >= MAX_RULE_SET_NESTING:
                raise SpecError(loc.shifted(node.col), f"rule sets are nested more than {MAX_RULE_SET_NESTING} deep",
                                "flatten the rule sets")
            out.extend(expand_uses(rule_sets[name], rule_sets, vars, depth, tuple(covered), using + (name,), budget))
        else:
            budget[0] -= 1
            if budget[0] < 0:
                raise SpecError(loc, f"the routing expands to more than {MAX_ROUTING_RULES} rules",
                                "nested `use` of rule sets multiplies rules; write fewer, broader rules")
            out.append((node, loc, tuple(covered)))
    return out


def plan_pass(name: str, entries, streams: tuple[str, ...], memory: tuple[str, ...], weights_mode: str,
              depth: int, rule_sets: dict, vars: dict) -> PassPlan:
    """Resolve one pass's rules into a `PassPlan` (validating every name)."""
    if depth * len(streams) > MAX_LAYER_STREAMS:
        at = entries[0][1] if entries else Loc("<spec>")
        raise SpecError(at, f"{depth} layers x {len(streams)} streams is more than the limit of {MAX_LAYER_STREAMS} "
                        "layer-stream pairs in one encoder", "use fewer layers or fewer streams")
    flat = expand_uses(entries, rule_sets, vars, depth)
    covered_total = 0
    for rule, loc, covered in flat:
        covered_total += len(covered) * len(rule.queries)
        if covered_total > MAX_ROUTING_ENTRIES:
            raise SpecError(loc, f"the routing covers more than {MAX_ROUTING_ENTRIES} (layer, query stream) pairs",
                            "rules that cover the same layers override each other: keep the ones that decide, "
                            "or use fewer layers or streams")
    # (layer, query, weights, cross) -> (Attend, rule index)
    table: dict[tuple, tuple[Attend, int]] = {}
    rule_layers: dict[int, set] = {}
    winners: dict[int, set] = {}
    for index, (rule, loc, covered) in enumerate(flat):
        for flag in rule.flags:
            if flag not in FLAGS:
                raise SpecError(loc, f"unknown routing flag '{flag}'", did_you_mean(flag, FLAGS, "a flag"))
        cross = "cross" in rule.flags
        pool = memory if cross else streams
        for q in rule.queries:
            if q not in streams:
                col = rule.name_cols.get(q, 0)
                raise SpecError(loc.shifted(col), f"routing names stream '{q}', which this encoder does not update",
                                did_you_mean(q, streams, "a stream") or "add it to the encoder's `streams:`")
        for names, side in ((rule.queries, "query"), (rule.keys, "key")):
            twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
            if twice is not None:
                raise SpecError(loc.shifted(rule.name_cols.get(twice, 0)), f"'{twice}' is listed twice as a {side} stream of this rule",
                                "name each stream once")
        for k in rule.keys:
            if k not in pool:
                col = rule.name_cols.get(k, 0)
                what = "memory stream" if cross else "stream"
                hint = did_you_mean(k, pool, f"a {what}")
                if not cross and k in memory:
                    hint = f"'{k}' is a memory stream: read it with a cross-attention rule `... <- {k} (cross)`"
                raise SpecError(loc.shifted(col), f"routing names {what} '{k}', which this encoder does not have", hint)
        if rule.via is not None and rule.via not in streams:
            raise SpecError(loc, f"`via {rule.via}` names no stream of this encoder", did_you_mean(rule.via, streams, "a stream"))
        if weights_mode == "shared" and rule.via is not None:
            raise SpecError(loc, f"`via {rule.via}` needs `weights: per_stream`; this encoder shares one set of weights",
                            "drop `via`, or set the encoder's `weights: per_stream`")
        for q in rule.queries:
            w = "shared" if weights_mode == "shared" else (rule.via or q)
            attend = Attend(q, tuple(rule.keys), w, "causal" in rule.flags, cross, loc)
            for layer in covered:
                table[(layer, q, w, cross)] = (attend, index)
                rule_layers.setdefault(index, set()).add((layer, q))
    for (layer, q, _, _), (_, index) in table.items():
        winners.setdefault(index, set()).add((layer, q))
    shadowed = []
    for index, covered in rule_layers.items():
        if index not in winners:
            by = max({i for (_, i) in table.values() if i > index} or {index})
            shadowed.append(Shadowed(flat[index][1], flat[by][1], flat[index][0].queries[0]))
    per_layer: list[list[Attend]] = [[] for _ in range(depth)]
    for (layer, *_), (attend, _) in sorted(table.items(), key=lambda kv: kv[1][1]):  # in rule order
        per_layer[layer].append(attend)
    layers = [LayerPlan(tuple(attends)) for attends in per_layer]
    return PassPlan(name, tuple(layers), tuple(shadowed))


def token_mask(layer: LayerPlan, counts: dict[str, int], order: tuple[str, ...]):
    """The dense boolean mask this layer's self-attention implies over ``order``'s tokens (True = may
    attend), as nested lists; rows are queries. A stream with no rule sees only itself (identity),
    matching the runtime, where it passes through unchanged. Causal rules mask future tokens within
    the query stream. This is the reference the planned attention is checked against."""
    offsets, total = {}, 0
    for s in order:
        offsets[s] = total
        total += counts[s]
    mask = [[False] * total for _ in range(total)]
    sees = {}
    for a in layer.self_attends():
        sees.setdefault(a.query, []).append(a)
    for q in order:
        q0, nq = offsets[q], counts[q]
        for a in sees.get(q, []):
            for k in a.keys:
                k0, nk = offsets[k], counts[k]
                for i in range(nq):
                    for j in range(nk):
                        if a.causal and k == q and j > i:
                            continue
                        mask[q0 + i][k0 + j] = True
        if q not in sees:
            for i in range(nq):
                mask[q0 + i][q0 + i] = True
    return mask
