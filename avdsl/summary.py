"""The build summary: streams, parameters per component, FLOPs, routing table — as data and as rich text.

`summarize` returns plain data (what `avdsl build --json` prints); `render` draws it for people.
"""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from . import ops
from .api import Analysis
from .ir import DropNode, EncoderNode, LatentNode, TokenizeNode
from .passes.cost import by_component, weight_set_params
from .passes.shapes import weight_sets


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def routing_table(analysis: Analysis) -> list[dict]:
    """One row per encoder, pass and run of identical layers: who attends to whom, with which weights."""
    rows = []
    for node in analysis.graph.of_type(EncoderNode):
        for pname, plan in node.plans.items():
            for start, stop, layer in plan.ranges():
                rules = []
                for a in layer.attends:
                    text = f"{a.query} <- {', '.join(a.keys)}"
                    if a.weights not in ("shared", a.query):
                        text += f" via {a.weights}"
                    flags = [f for f, on in (("causal", a.causal), ("cross", a.cross)) if on]
                    if flags:
                        text += f" ({', '.join(flags)})"
                    rules.append(text)
                rows.append({"encoder": node.id, "pass": pname or None, "layers": [start, stop], "rules": rules})
    return rows


def streams_table(analysis: Analysis) -> list[dict]:
    g = analysis.graph
    rows = []
    for name, s in analysis.spec.streams.items():
        final = g.tensors.get(g.stream_tensor(name))
        source = {"input": f"input {s.input}", "from": f"from {s.from_ref.name if s.from_ref else ''}",
                  "latent": "learned latent"}[s.source]
        notes = []
        for node in g.nodes():
            if getattr(node, "stream", None) != name:
                continue
            if isinstance(node, TokenizeNode):
                notes.append(_call_text(node.op, node.args))
            if isinstance(node, DropNode):
                notes.append(f"{node.op}({node.rate})")
            if isinstance(node, LatentNode) and node.prepend:
                notes.append(f"+{node.count} cls")
        rows.append({"stream": name, "source": source, "tokens": final.shape[1] if final else None,
                     "width": final.shape[-1] if final else None, "notes": ", ".join(notes)})
    return rows



def summarize(analysis: Analysis) -> dict:
    """The summary as plain data (stable keys: scripts read `avdsl build --json`)."""
    cost, g = analysis.cost, analysis.graph
    batch = analysis.spec.dims.get(str(next(iter(analysis.spec.inputs.values())).dims[0]), 1)
    components = by_component(g, cost.params)
    encoders, by_weight_set = {}, {}
    for node in g.of_type(EncoderNode):
        sets = weight_sets(node)
        ws_params = weight_set_params(node, g)
        if len(ws_params) > 1:  # a per-stream encoder: its count per modality (and a shared final norm)
            by_weight_set.update({f"encoders.{node.id}.{k}": v for k, v in ws_params.items()})
        encoders[node.id] = {
            "weights": node.decl.weights,
            "weight_sets": {k: {"width": v.sizes.width, "depth": v.sizes.depth, "heads": v.sizes.heads, "mlp_dim": v.sizes.mlp_dim,
                                "params": ws_params[k]} for k, v in sets.items()},
            "passes": [p for p in node.plans if p] or None,
            "flops_per_sample": cost.flops[node.id],
        }
    return {
        "name": analysis.spec.name,
        "file": analysis.doc.file,
        "spec_hash": analysis.doc.hash(),
        "inputs": {n: {"shape": list(d.dims), "kind": d.kind} for n, d in analysis.spec.inputs.items()},
        "streams": streams_table(analysis),
        "encoders": encoders,
        "routing": routing_table(analysis),
        "parameters": {"total": cost.total_params, "trainable": cost.total_params - cost.total_frozen,
                       "frozen": cost.total_frozen, "by_component": components, "by_weight_set": by_weight_set},
        "flops": {"forward_per_sample": cost.total_flops, "batch": batch, "forward_per_batch": cost.total_flops * batch},
        "outputs": {n: list(g.tensors[t].shape) for n, t in g.outputs.items()},
        "losses": list(g.losses),
    }


def _call_text(name: str, args: dict) -> str:
    """A tokenizer call as written: required arguments by position, others only where not the default."""
    parts = []
    for p in ops.OPS[name].params:
        value = args.get(p.name, p.default)
        if p.default is ...:
            parts.append(str(value))
        elif value != p.default:
            parts.append(f"{p.name}={str(value).lower() if isinstance(value, bool) else value}")
    return f"{name}({', '.join(parts)})"


def render(summary: dict):
    """A rich renderable of the summary."""
    title = Text.assemble((summary["name"], "bold"), f"  ({summary['file']}, spec {summary['spec_hash']})")
    streams = Table(title="streams", title_justify="left", expand=False)
    for col in ("stream", "source", "tokens", "width", "tokenizer / notes"):
        streams.add_column(col, justify="right" if col in ("tokens", "width") else "left")
    for r in summary["streams"]:
        streams.add_row(r["stream"], r["source"], str(r["tokens"]), str(r["width"]), r["notes"])

    routing = Table(title="routing (queries <- keys)", title_justify="left")
    for col in ("encoder", "pass", "layers", "rules"):
        routing.add_column(col)
    for r in summary["routing"]:
        routing.add_row(r["encoder"], r["pass"] or "", f"{r['layers'][0]}..{r['layers'][1]}", "\n".join(r["rules"]) or "(none)")

    params = Table(title="parameters", title_justify="left")
    params.add_column("component")
    params.add_column("parameters", justify="right")
    params.add_column("share", justify="right")
    total = summary["parameters"]["total"] or 1
    parts = summary["parameters"].get("by_weight_set", {})
    for k, v in sorted(summary["parameters"]["by_component"].items(), key=lambda kv: -kv[1]):
        params.add_row(k, f"{v:,}", f"{100 * v / total:.1f}%")
        for part, n in parts.items():  # a per-stream encoder, split by weight set
            if part.startswith(k + "."):
                params.add_row(Text(f"  of which {part[len(k) + 1:]}", style="dim"), Text(f"{n:,}", style="dim"), "")
    p = summary["parameters"]
    params.add_row(Text("total", style="bold"), Text(f"{p['total']:,}", style="bold"), "")
    if p["frozen"]:
        params.add_row("  of which frozen", f"{p['frozen']:,}", "")
    f = summary["flops"]
    flops = Text(f"forward FLOPs: {_human(f['forward_per_sample'])} per sample, {_human(f['forward_per_batch'])} "
                 f"per batch of {f['batch']} (attention counts only the pairs the routing allows)")
    outputs = Text("outputs: " + ", ".join(f"{k} {v}" for k, v in summary["outputs"].items()) +
                   "\nlosses: " + (", ".join(summary["losses"]) or "none"))
    return Group(title, streams, routing, params, flops, outputs)
