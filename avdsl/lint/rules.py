"""The lint rules: each defined once, with a stable code, a name, a summary line and an explanation.

Codes are grouped by kind: S1xx structure, R2xx routing and information flow, H3xx shapes, L4xx
losses. A rule either has a ``check`` (a pure function of a `Context` yielding findings) or is raised
by the core passes themselves as a `SpecError` carrying the rule's code (``check`` is None): those
mistakes stop a build, so the one check lives where the build needs it and lint reports its result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from .. import ops
from ..api import Analysis
from ..diagnostics import Diagnostic, Loc
from ..ir import CallNode, EncoderNode, LatentNode, LossNode
from ..passes.shapes import weight_sets
from .flow import Flow, Source, reads

AUDIO_KINDS = ("fbank", "waveform")
TARGET_KINDS = ("label", "multilabel")  # may be declared for evaluation or for specs that extend this one


@dataclass(frozen=True)
class Context:
    """What a check may look at: the analysed spec and its information flow."""

    analysis: Analysis
    flow: Flow


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    summary: str
    explanation: str
    severity: str = "warning"  # "error" for rules raised by the build itself
    check: Callable[["Rule", Context], Iterator[Diagnostic]] | None = None  # (this rule, context) -> findings

    def finding(self, loc: Loc, message: str, hint: str) -> Diagnostic:
        return Diagnostic(loc, message, hint, code=self.code, severity=self.severity)


# ------------------------------------------------------------------------------------ checks

def _unused_inputs(rule: Rule, ctx: Context):
    g = ctx.analysis.graph
    for name, decl in ctx.analysis.spec.inputs.items():
        if decl.kind not in TARGET_KINDS and g.g.out_degree(name) == 0:
            yield rule.finding(decl.loc, f"input '{name}' is declared but nothing reads it",
                               f"tokenize it in a stream (`input: {name}`), use it in a loss, or remove it")


def _never_updated(rule: Rule, ctx: Context):
    for node in ctx.analysis.graph.of_type(EncoderNode):
        named = {s for plan in node.plans.values() for layer in plan.layers for a in layer.attends for s in (a.query,) + a.keys}
        for s in node.streams:
            if s not in named:
                yield rule.finding(node.decl.locs.get("streams", node.loc),
                                   f"encoder '{node.id}' lists stream '{s}', but no routing rule names it: "
                                   "it attends to nothing and nothing attends to it",
                                   f"add a rule like `{s} <- {s}` or let another stream read it; or remove '{s}' from `streams:`")


def _final_dependants(ctx: Context) -> set[str]:
    """Every source some output or loss depends on."""
    g, deps = ctx.analysis.graph, ctx.flow.deps
    used: set[str] = set()
    for t in list(g.outputs.values()) + list(g.losses.values()):
        used |= deps.get(t, frozenset())
    return used


def _dead_streams(rule: Rule, ctx: Context):
    used = _final_dependants(ctx)
    for name, s in ctx.analysis.spec.streams.items():
        if Source("stream", name) in used:
            continue
        what = "latent tokens" if s.source == "latent" else "tokens"
        yield rule.finding(s.loc, f"no output or loss depends on stream '{name}': its {what} never reach an output",
                           f"let another stream attend to '{name}' (e.g. `... <- ..., {name}`), pool it in an output, or remove it")


def _shadowed(rule: Rule, ctx: Context):
    for node in ctx.analysis.graph.of_type(EncoderNode):
        for plan in node.plans.values():
            for sh in plan.shadowed:
                yield rule.finding(sh.rule_loc, f"this rule for '{sh.query}' is overridden in every layer it covers "
                                   f"by the rule at line {sh.by_loc.line}",
                                   "remove it, or narrow the later rule's layer range (`@ a..b`) so both take effect")


def _modality_words(ctx: Context, stream: str) -> set[str]:
    """Names that claim a stream's modality in an output name: the stream, its input, the input's kind."""
    spec = ctx.analysis.spec
    words = {stream}
    s = spec.streams[stream]
    decl = spec.inputs.get(s.input) if s.source == "input" else None
    if decl is not None:
        words |= {decl.name, decl.kind} | ({"audio"} if decl.kind in AUDIO_KINDS else set())
    return words


def _unimodal_leaks(rule: Rule, ctx: Context):
    g, flow, spec = ctx.analysis.graph, ctx.flow, ctx.analysis.spec
    for name, tensor in g.outputs.items():
        streams = reads(g, flow, tensor)
        if len(streams) != 1:
            continue
        (stream,) = streams
        if spec.streams[stream].source != "input" or name.split("_")[0] not in _modality_words(ctx, stream):
            continue
        own = flow.sources_of(ctx.analysis.graph.stream_tensor(stream), "input")
        foreign = sorted(flow.sources_of(tensor, "input") - own)
        if not foreign:
            continue
        via = _leak_path(ctx, tensor, Source("input", foreign[0]))
        yield rule.finding(spec.outputs[name].loc,
                           f"output '{name}' reads only stream '{stream}', but it depends on input"
                           f"{'s' if len(foreign) > 1 else ''} {', '.join(repr(f) for f in foreign)} through routing{via}",
                           f"if '{name}' should be unimodal, keep other streams out of what '{stream}' attends to; "
                           f"if the mix is intended, rename the output or add `# noqa: {rule.code}` to its line")


def _leak_path(ctx: Context, tensor: str, source: Source) -> str:
    """`` (layer 3 of backbone: audio <- fusion)`` for the first encoder output on the way that let it in."""
    flow = ctx.flow
    for t in ctx.analysis.graph.upstream(tensor):
        e = flow.entries.get((t, source))
        if e is not None:
            where = f"{e.encoder}" + (f" pass {e.pass_}" if e.pass_ else "")
            return f" (from layer {e.layer} of {where}: {flow.stream_of[t]} <- {e.via})"
    return ""


def _isolated_latents(rule: Rule, ctx: Context):
    g, flow = ctx.analysis.graph, ctx.flow
    for node in g.of_type(LatentNode):
        if node.prepend:
            continue
        outs = [t for t, s in flow.stream_of.items() if s == node.stream and "." in t and g.producer.get(t) in
                {n.id for n in g.of_type(EncoderNode)}]
        if outs and not any(flow.sources_of(t, "input") for t in outs):
            yield rule.finding(node.loc, f"latent stream '{node.stream}' never reads an input stream: its encoder output "
                               "is the same for every example",
                               f"let it attend to the streams it should summarise, e.g. `{node.stream} <- audio, video, {node.stream}`")


def _head_dim(rule: Rule, ctx: Context):
    for node in ctx.analysis.graph.of_type(EncoderNode):
        for ws in weight_sets(node).values():
            d = ws.sizes.width // ws.sizes.heads
            if ws.sizes.width % ws.sizes.heads == 0 and d % 8:
                yield rule.finding(node.decl.locs.get("heads", node.loc),
                                   f"head dimension {d} (width {ws.sizes.width} / {ws.sizes.heads} heads) of encoder "
                                   f"'{node.id}' is not a multiple of 8",
                                   "fused attention kernels want head dims that are multiples of 8 (64 is usual); change width or heads")


def _loss_terms(ctx: Context):
    g = ctx.analysis.graph
    for node in g.of_type(LossNode):
        terms = [g.node(g.producer[t]) for t in node.inputs]
        yield ctx.analysis.spec.losses[node.name], node, terms


def _nonpositive_weights(rule: Rule, ctx: Context):
    for item, node, terms in _loss_terms(ctx):
        for w, term in zip(node.weights, terms):
            if w <= 0:
                yield rule.finding(item.loc, f"loss '{node.name}' weighs its {term.op}() term by {w:g}",
                                   "a zero weight trains nothing and a negative one pushes the term up; "
                                   "remove the term or give it a positive weight")


def _self_comparisons(rule: Rule, ctx: Context):
    for item, node, terms in _loss_terms(ctx):
        for term in terms:
            if isinstance(term, CallNode) and ops.OPS[term.op].contrastive and \
                    len(term.inputs) >= 2 and term.inputs[0] == term.inputs[1]:
                yield rule.finding(item.loc, f"loss '{node.name}' contrasts '{term.inputs[0].removeprefix('out.')}' with itself",
                                   "a contrastive loss needs two different views, e.g. `nce(za, zv)`")


def _no_losses(rule: Rule, ctx: Context):
    if not ctx.analysis.spec.losses:
        yield rule.finding(ctx.analysis.doc.loc(), "the spec has no losses, so it cannot be trained",
                           "add e.g. `losses: {contrastive: nce(za, zv)}`")


# -------------------------------------------------------------------------------- the table

def _rule(code, name, summary, explanation, check=None, severity="warning") -> Rule:
    return Rule(code, name, summary, " ".join(explanation.split()), severity, check)


RULES: tuple[Rule, ...] = (
    _rule("S101", "duplicate-name", "Two inputs, streams, encoders, outputs or losses share a name.",
          """Every name in a spec lives in one namespace, so that `backbone.audio` or `za` means one thing.
          The graph builder refuses a name used twice; lint reports it with this code.""", severity="error"),
    _rule("S102", "unused-input", "An input is declared but nothing reads it.",
          """A signal input (video, image, fbank, waveform, text) that no stream tokenizes and no loss uses
          still has to be decoded and fed by every data loader. Usually a stream forgot `input:`. Label
          inputs are exempt: a base spec may declare them for evaluation or for specs that extend it.""",
          _unused_inputs),
    _rule("R201", "stream-not-routed", "An encoder lists a stream that no routing rule names.",
          """A stream in an encoder's `streams:` that no rule names, as query or as key, attends to nothing
          and nothing attends to it: the encoder carries it for no purpose and has no output for it. A
          stream that is only read as a key (a Perceiver's inputs) is fine.""", _never_updated),
    _rule("R202", "dead-stream", "No output or loss depends on a stream (latent tokens included).",
          """Following the routing layer by layer, lint computes which streams each output and loss depends
          on. A stream none of them depends on costs parameters and FLOPs for nothing: nobody pools it and
          no stream that is pooled attends to it. For latent (fusion, bottleneck) tokens this means the
          latents never reach an output.""", _dead_streams),
    _rule("R203", "shadowed-rule", "A routing rule is overridden by later rules in every layer it covers.",
          """For each layer the last rule covering a (query stream, weight set) wins. A rule that wins in no
          layer has no effect, which is almost always a mistake in a layer range (`@ a..b`).""", _shadowed),
    _rule("R204", "unimodal-leak", "An output named for one modality depends on another input through routing.",
          """An output is taken as declared unimodal when it reads exactly one input stream (directly or through
          other outputs) and its name starts with that stream's name, its input's name or kind (`audio_out`,
          `video_embedding`). Lint follows the routing layer by layer and reports such an output when it
          depends on any other input, naming the first layer and key stream that let it in. Zorro relies on
          this isolation; MBT-style fusion mixes on purpose: rename the output or end its line with
          `# noqa: R204` to say so.""", _unimodal_leaks),
    _rule("R205", "isolated-latent", "A latent stream never reads an input stream.",
          """Latent tokens (fusion, bottleneck, a Perceiver array) start as learned constants. If, through
          the routing, they never attend to a stream carrying input, the encoder's output for them is the
          same for every example and carries no information.""", _isolated_latents),
    _rule("H301", "heads-divide-width", "An encoder's width is not divisible by its number of heads.",
          """Multi-head attention splits the width into equal heads. The shape pass refuses a width the heads
          do not divide; lint reports it with this code.""", severity="error"),
    _rule("H302", "patch-divides-input", "A patch or tubelet size does not divide its input.",
          """Tokenizers cut inputs into non-overlapping patches, so each patch size must divide the matching
          input dimension. The shape pass refuses it; lint reports it with this code and the hint lists
          sizes that do divide.""", severity="error"),
    _rule("H303", "head-dim-multiple-of-8", "An encoder's head dimension is not a multiple of 8.",
          """Fused scaled-dot-product attention kernels (flash, memory-efficient) need head dimensions that
          are multiples of 8; other sizes fall back to a slower path. ViT-B uses 768 / 12 = 64.""", _head_dim),
    _rule("L401", "nonpositive-loss-weight", "A loss term has a zero or negative weight.",
          """The training objective is the sum of the named losses, each a weighted sum of loss calls. A zero
          weight computes a term that trains nothing; a negative one maximises it.""", _nonpositive_weights),
    _rule("L402", "self-contrast", "A contrastive loss compares an output with itself.",
          """Contrastive losses (""" + ", ".join(op.name for op in ops.OPS.values() if op.contrastive) + """) pull matching
          rows of two embeddings together and push the others apart. Given the same tensor twice, the positives
          are trivially matched.""", _self_comparisons),
    _rule("L403", "no-losses", "The spec has no losses.",
          """Without `losses:` the model has no training objective; `avdsl train` needs at least one.""", _no_losses),
)

BY_CODE: dict[str, Rule] = {r.code: r for r in RULES}


def run_checks(ctx: Context) -> list[Diagnostic]:
    """Every finding of every rule that has a check, in file order."""
    found = [d for rule in RULES if rule.check for d in rule.check(rule, ctx)]
    return sorted(found, key=lambda d: (d.loc.file, d.loc.line, d.loc.column, d.code))
