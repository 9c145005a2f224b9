"""Pictures of a spec: the dataflow graph and the routing masks.

`dataflow` condenses the graph IR to what a reader names: inputs, streams (the whole embedding chain
of a stream is one box), encoders, outputs and losses. It is written as Graphviz dot or Mermaid text,
or drawn with matplotlib (layers by longest path from the inputs). `mask_panels` turns each encoder's
routing into one panel per pass and run of identical layers: a query x key grid of streams, each block
sized by the square root of its token count (with a floor so a handful of fusion tokens stay visible). `masks_text` is
the compact terminal version, `draw_masks` the heatmap.
"""
from __future__ import annotations

from dataclasses import dataclass

from .api import Analysis
from . import ops
from .ir import CallNode, EncoderNode, FromNode, Graph

KIND_COLORS = {"input": "#dbe9f6", "stream": "#fde7c8", "encoder": "#d5f0d5", "output": "#ead9f2", "loss": "#f7d4d4"}


@dataclass(frozen=True)
class Box:
    id: str
    kind: str  # input | stream | encoder | output | loss
    label: str


@dataclass
class Dataflow:
    boxes: dict  # id -> Box
    edges: list  # (from id, to id)
    shares: list = None  # (owner id, user id, what): weights one box uses of another, drawn dashed

    def __post_init__(self):
        self.shares = self.shares or []


_BOX_KINDS = {"inputs": "input", "encoders": "encoder", "losses": "loss", "outputs": "output", "streams": "stream"}


def _box_of(node) -> tuple[str, str, str]:
    """(box id, kind, name) for an IR node: one box per spec component."""
    group, name = node.component
    name = name.split(".memory.")[0]  # a projection of an encoder's memory is drawn inside that encoder
    kind = _BOX_KINDS[group]
    return f"{kind}:{name}", kind, name


def dataflow(analysis: Analysis) -> Dataflow:
    """The condensed dataflow graph of a spec."""
    g: Graph = analysis.graph
    boxes, edges, shares, projections = {}, [], [], {}
    of = {}
    for node in g.nodes():
        bid, kind, name = _box_of(node)
        of[node.id] = bid
        if bid not in boxes:
            label = name
            if kind == "input":
                decl = node.decl
                label = f"{name}\n{decl.kind} [{', '.join(str(d) for d in decl.dims)}]"
            elif kind == "stream":
                t = g.tensors.get(node.outputs[0])
                label = f"{name}\n{t.shape[1]} tokens" if t else name
            elif kind == "encoder":
                enc = g.node(name)
                s = enc.decl.sizes
                label = f"{name}\n{s.depth} x {s.width}, {enc.decl.weights}"
                if list(enc.plans) != [""]:
                    label += "\npasses: " + ", ".join(enc.plans)
            elif kind == "loss" and name in analysis.spec.losses:
                label = f"loss {name}"
            boxes[bid] = Box(bid, kind, label)
        elif kind == "stream":
            t = g.tensors.get(node.outputs[0])
            if t:
                boxes[bid] = Box(bid, kind, f"{name}\n{t.shape[1]} tokens" + projections.get(name, ""))
        if isinstance(node, FromNode):
            w_in, w_out = g.tensors[node.inputs[0]].shape[-1], g.tensors[node.outputs[0]].shape[-1]
            if w_in != w_out:  # a width projection between encoders
                projections[name] = f", linear {w_in} -> {w_out}"
                boxes[bid] = Box(bid, kind, boxes[bid].label + projections[name])
            if node.share:
                shares.append((f"stream:{node.share}", bid, "shares projection"))
        if isinstance(node, CallNode) and ops.OPS[node.op].share and node.args.get(ops.OPS[node.op].share):
            shares.append((f"output:{node.args[ops.OPS[node.op].share]}", bid, "shares weights"))
    for u, v in g.g.edges:
        a, b = of[u], of[v]
        if a != b and (a, b) not in edges:
            edges.append((a, b))
    return Dataflow(boxes, edges, shares)


def _safe(bid: str) -> str:
    return bid.replace(":", "_").replace(".", "_").replace("-", "_")


def to_dot(flow: Dataflow, name: str = "spec") -> str:
    shapes = {"input": "box", "stream": "box", "encoder": "box3d", "output": "ellipse", "loss": "octagon"}
    lines = [f'digraph "{name}" {{', "  rankdir=LR;", '  node [fontname="Helvetica", style=filled];']
    for b in flow.boxes.values():
        label = b.label.replace("\n", "\\n").replace('"', '\\"')
        lines.append(f'  {_safe(b.id)} [label="{label}", shape={shapes[b.kind]}, fillcolor="{KIND_COLORS[b.kind]}"];')
    lines += [f"  {_safe(a)} -> {_safe(b)};" for a, b in flow.edges]
    lines += [f'  {_safe(a)} -> {_safe(b)} [style=dashed, label="{what}"];' for a, b, what in flow.shares]
    return "\n".join(lines + ["}"]) + "\n"


def to_mermaid(flow: Dataflow) -> str:
    brackets = {"input": ('[/"', '"/]'), "stream": ('["', '"]'), "encoder": ('[["', '"]]'), "output": ('("', '")'),
                "loss": ('{{"', '"}}')}
    lines = ["flowchart LR"]
    for b in flow.boxes.values():
        left, right = brackets[b.kind]
        lines.append(f"  {_safe(b.id)}{left}{b.label.replace(chr(10), '<br/>')}{right}")
    lines += [f"  {_safe(a)} --> {_safe(b)}" for a, b in flow.edges]
    lines += [f"  {_safe(a)} -.->|{what}| {_safe(b)}" for a, b, what in flow.shares]
    return "\n".join(lines) + "\n"


def layers_by_depth(flow: Dataflow) -> dict[str, int]:
    """Each box's column: the longest path to it from a box with no inputs. A box with no inputs that
    only feeds later columns (a label read by a loss) sits just before its first reader."""
    depth = {b: 0 for b in flow.boxes}
    for _ in range(len(flow.boxes)):
        changed = False
        for a, b in flow.edges:
            if depth[b] < depth[a] + 1:
                depth[b] = depth[a] + 1
                changed = True
        if not changed:
            break
    has_input = {b for _, b in flow.edges}
    for bid in flow.boxes:
        readers = [depth[b] for a, b in flow.edges if a == bid]
        if bid not in has_input and readers:
            depth[bid] = min(readers) - 1
    return depth


def draw_dataflow(flow: Dataflow, path: str, title: str = "") -> None:
    """Draw the graph left to right, one column per depth, with matplotlib (png or svg by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    depth = layers_by_depth(flow)
    columns: dict[int, list[str]] = {}
    for bid in flow.boxes:  # insertion order follows the graph's topological order
        columns.setdefault(depth[bid], []).append(bid)
    tallest = max(len(c) for c in columns.values())
    fig, ax = plt.subplots(figsize=(2.3 * len(columns) + 1, 1.0 * tallest + 1.2))
    pos = {}
    for col, ids in columns.items():
        for row, bid in enumerate(ids):
            pos[bid] = (col * 2.3, (tallest - 1) / 2 - row + (len(ids) - 1) / 2 - (tallest - 1) / 2 + (tallest - 1) / 2)
    w, h = 1.7, 0.62
    bottom = min(p[1] for p in pos.values()) - h
    lane = 0
    for a, b in flow.edges:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        start = (x0 + w / 2, y0)
        if depth[b] - depth[a] > 1:
            # an edge that skips columns runs in the gaps between columns and under every box
            lane += 1
            y = bottom - 0.18 * lane
            gap0, gap1 = x0 + w / 2 + 0.2, x1 - w / 2 - 0.2
            ax.plot([start[0], gap0, gap0, gap1, gap1], [y0, y0, y, y, y1], color="#555555", lw=0.9)
            start = (gap1, y1)
        ax.annotate("", xy=(x1 - w / 2, y1), xytext=start,
                    arrowprops=dict(arrowstyle="-|>", color="#555555", lw=0.9, shrinkA=0, shrinkB=0,
                                    connectionstyle="arc3,rad=0.0"))
    for a, b, what in flow.shares:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        if x0 == x1:  # one column: an arc on the right, outside both boxes
            ends, rad, note = ((x0 + w / 2, y0), (x1 + w / 2, y1)), (-0.5 if y0 > y1 else 0.5), (x0 + w / 2 + 0.15, (y0 + y1) / 2)
        else:
            ends, rad, note = ((x0, y0 + h / 2), (x1, y1 + h / 2)), -0.4, ((x0 + x1) / 2, max(y0, y1) + h / 2 + 0.25)
        ax.annotate("", xy=ends[1], xytext=ends[0],
                    arrowprops=dict(arrowstyle="-|>", color="#8a5a00", lw=0.9, ls="--", shrinkA=0, shrinkB=0,
                                    connectionstyle=f"arc3,rad={rad}"))
        ax.text(*note, what, ha="left" if x0 == x1 else "center", va="center", fontsize=6.5, color="#8a5a00")
    for bid, box in flow.boxes.items():
        x, y = pos[bid]
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    fc=KIND_COLORS[box.kind], ec="#333333", lw=0.8))
        first, _, rest = box.label.partition("\n")
        ax.text(x, y + (0.1 if rest else 0), first, ha="center", va="center", fontsize=8.5, weight="bold")
        if rest:
            ax.text(x, y - 0.15, rest, ha="center", va="center", fontsize=6.5)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.1, max(xs) + 1.1)
    ax.set_ylim(min(min(ys) - 0.7, bottom - 0.18 * lane - 0.3), max(ys) + 0.7 + (0.4 if flow.shares else 0))
    ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, fc=c, ec="#333333") for c in KIND_COLORS.values()]
    ax.legend(handles, list(KIND_COLORS), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=5, frameon=False, fontsize=8)
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- masks

@dataclass(frozen=True)
class MaskPanel:
    """One run of layers with the same routing: rows are query streams, columns key streams."""

    title: str
    rows: tuple[str, ...]  # the encoder's streams
    cols: tuple[str, ...]  # its streams, then memory streams
    counts: dict  # stream -> tokens
    cells: dict  # (query, key) -> "full" | "causal" | "cross" | "self" (passes through unchanged)


def mask_panels(analysis: Analysis) -> list[MaskPanel]:
    g = analysis.graph
    panels = []
    for node in g.of_type(EncoderNode):
        stream_in = dict(zip(node.streams + node.memory, node.inputs))
        counts = {s: g.tensors[t].shape[1] for s, t in stream_in.items()}
        for pname, plan in node.plans.items():
            for start, stop, layer in plan.ranges():
                cells = {}
                for a in layer.attends:
                    for k in a.keys:
                        kind = "cross" if a.cross else ("causal" if a.causal and k == a.query else "full")
                        if cells.get((a.query, k)) != "full":
                            cells[(a.query, k)] = kind
                for s in node.streams:
                    if s not in layer.updated():
                        cells[(s, s)] = "self"
                where = node.id + (f" pass {pname}" if pname else "")
                span = f"layer {start}" if stop == start + 1 else f"layers {start}..{stop}"
                panels.append(MaskPanel(f"{where}, {span}", node.streams, node.streams + node.memory, counts, cells))
    return panels


def masks_text(panels: list[MaskPanel]) -> str:
    """A stream x stream grid per panel: ■ attends, ◣ causal, × cross-attention, · no, ─ passes through."""
    marks = {"full": "■", "causal": "◣", "cross": "×", "self": "─"}
    out = []
    for p in panels:
        width = max(len(s) for s in p.rows + p.cols)
        out.append(p.title)
        out.append(" " * (width + 4) + " ".join(c[:3].ljust(3) for c in p.cols))
        for q in p.rows:
            row = " ".join(marks.get(p.cells.get((q, k)), "·").ljust(3) for k in p.cols)
            out.append(f"  {q.rjust(width)} <- {row}   ({p.counts[q]} tokens)")
        out.append("")
    out.append("■ attends  ◣ causal  × cross-attention  ─ passes through unchanged  · does not attend")
    return "\n".join(out) + "\n"


def _block_sizes(streams, counts: dict) -> list[float]:
    """Display sizes: the square root of token counts (so 4 bottleneck tokens next to 3136 video
    tokens stay visible), each at least 10% of the total; the labels give the true counts."""
    raw = [float(counts[s]) ** 0.5 if isinstance(counts[s], int) else 1.0 for s in streams]
    total = sum(raw)
    return [max(r, 0.1 * total) for r in raw]


def draw_masks(panels: list[MaskPanel], path: str, title: str = "") -> None:
    """One heatmap per panel, blocks sized by token counts (floored), labelled with stream names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon, Rectangle

    colors = {"full": "#1f4e79", "causal": "#1f4e79", "cross": "#b35900", "self": "#9dbcd8"}
    n = len(panels)
    ncols = min(n, 3)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.3 * ncols, 7.5), 4.3 * nrows + 0.4), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, p in zip(axes.flat, panels):
        ys, xs = _block_sizes(p.rows, p.counts), _block_sizes(p.cols, p.counts)
        y0 = [sum(ys[:i]) for i in range(len(ys))]
        x0 = [sum(xs[:i]) for i in range(len(xs))]
        ax.add_patch(Rectangle((0, 0), sum(xs), sum(ys), fc="#f2f2f2", ec="none"))
        for i, q in enumerate(p.rows):
            for j, k in enumerate(p.cols):
                kind = p.cells.get((q, k))
                if kind is None:
                    continue
                x, y, w, h = x0[j], y0[i], xs[j], ys[i]
                if kind == "causal":  # lower triangle: a token sees itself and earlier ones
                    ax.add_patch(Polygon([(x, y), (x, y + h), (x + w, y + h)], closed=True, fc=colors[kind], ec="none"))
                elif kind == "self":  # identity: only the diagonal
                    ax.plot([x, x + w], [y, y + h], color=colors["full"], lw=1.5)
                    ax.add_patch(Rectangle((x, y), w, h, fc=colors[kind], ec="none", alpha=0.35))
                else:
                    ax.add_patch(Rectangle((x, y), w, h, fc=colors[kind], ec="none"))
        for edge in [sum(xs[:i]) for i in range(1, len(xs))]:
            ax.axvline(edge, color="white", lw=1.5)
        for edge in [sum(ys[:i]) for i in range(1, len(ys))]:
            ax.axhline(edge, color="white", lw=1.5)
        ax.set_xlim(0, sum(xs))
        ax.set_ylim(sum(ys), 0)
        ax.set_xticks([a + b / 2 for a, b in zip(x0, xs)])
        ax.set_xticklabels([f"{k}\n{p.counts[k]}" for k in p.cols], fontsize=8)
        ax.set_yticks([a + b / 2 for a, b in zip(y0, ys)])
        ax.set_yticklabels([f"{q} ({p.counts[q]})" for q in p.rows], fontsize=8)
        ax.xaxis.tick_top()
        ax.set_xlabel("keys (tokens)", fontsize=8)
        ax.set_ylabel("queries", fontsize=8)
        ax.set_title(p.title, fontsize=9, pad=24)
        ax.tick_params(length=0)
        ax.set_aspect("auto")
    legend = [Rectangle((0, 0), 1, 1, fc=colors["full"]), Rectangle((0, 0), 1, 1, fc=colors["cross"]),
              Rectangle((0, 0), 1, 1, fc=colors["self"], alpha=0.35), Rectangle((0, 0), 1, 1, fc="#f2f2f2")]
    fig.legend(legend, ["attends (triangle: causal)", "cross-attention", "passes through unchanged", "masked"],
               loc="lower center", ncol=4, frameon=False, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
