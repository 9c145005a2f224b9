"""Semantic diff of two specs: what changed in the model, not in the text.

`diff_analyses` compares two analysed specs section by section: streams, encoders, routing (as
stream-mask differences: which query stream gained or lost which key stream, in which layers),
outputs, losses, plain values (vars, dims, inputs, train), and parameter and FLOP counts per
component. The result is plain data (what `avdsl diff --json` prints); `render` draws it for people.
A spec can be named as a file, a built-in name, or ``path@revision`` (read with ``git show``).
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .api import Analysis, analyse, analyse_doc
from .diagnostics import Loc, SpecError
from .ir import EncoderNode
from .limits import GIT_TIMEOUT_S, MAX_SPEC_BYTES
from .loader import decode_spec, load_text, resolve_spec_path
from .passes.cost import by_component
from .routing import plan_pass
from .summary import _human, streams_table

VALUE_SECTIONS = ("vars", "dims", "inputs", "train")


REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./~^@{}+-]*")  # never starts with '-': cannot be a git option


def load_side(ref: str, overrides: list[str] = ()) -> Analysis:
    """Analyse a spec named by path, built-in name, or ``path@revision`` (a git revision of a file)."""
    if "@" in ref and resolve_spec_path(ref) is None:
        path, rev = ref.rsplit("@", 1)
        if not REVISION.fullmatch(rev) or ".." in rev or not path or path.startswith("-"):
            raise SpecError(Loc(ref, 1, 1), f"'{rev}' is not a git revision avdsl accepts",
                            "write `path@revision` with a revision such as HEAD~1, main, v1.2 or a commit hash")
        read = GitRevision(rev, ref)
        text = read(Path(path))
        if text is None:
            raise SpecError(Loc(ref, 1, 1), f"cannot read '{path}' at git revision '{rev}': {read.problem}",
                            "write `path@revision` with a path relative to here, e.g. `specs/zorro.yaml@HEAD~1`")
        return analyse_doc(load_text(text, ref, list(overrides), folder=Path(os.path.normpath(Path(path).parent)), read=read))
    return analyse(ref, list(overrides))


class GitRevision:
    """Reads files of the working tree's repository at one revision (``git cat-file``), refusing blobs
    over the spec size limit before reading them. Call it with a path relative to here."""

    def __init__(self, revision: str, shown: str):
        self.revision, self.shown, self.problem = revision, shown, ""

    def _git(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
        return subprocess.run(["git", "cat-file", *args], capture_output=True, timeout=GIT_TIMEOUT_S, env=env)

    def __call__(self, path: Path) -> str | None:
        obj = f"{self.revision}:./{path.as_posix()}"
        try:
            size = self._git("-s", "--end-of-options", obj)
            if size.returncode != 0:
                self.problem = size.stderr.decode("utf-8", "replace").strip()[:300] or "git failed"
                return None
            if int(size.stdout.strip() or 0) > MAX_SPEC_BYTES:
                raise SpecError(Loc(self.shown, 1, 1), f"'{path}' at '{self.revision}' is larger than {MAX_SPEC_BYTES // 1000} kB",
                                "specs are short; is this the right file?")
            blob = self._git("--end-of-options", "blob", obj)
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            self.problem = str(e)[:300]
            return None
        if blob.returncode != 0:
            self.problem = blob.stderr.decode("utf-8", "replace").strip()[:300] or "git failed"
            return None
        return decode_spec(blob.stdout[: MAX_SPEC_BYTES + 1], f"{path.as_posix()}@{self.revision}")


def layer_runs(layers) -> str:
    """Layers as half-open runs: {0, 1, 2, 8} -> ``0..3, 8``."""
    runs, out = [], []
    for i in sorted(layers):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    for a, b in runs:
        out.append(str(a) if b == a + 1 else f"{a}..{b}")
    return ", ".join(out)


def _changes(old: dict, new: dict) -> dict:
    """{key: [old, new]} for keys whose values differ (None where a side lacks the key)."""
    return {k: [old.get(k), new.get(k)] for k in list(old) + [k for k in new if k not in old] if old.get(k) != new.get(k)}


def _table_diff(old: dict, new: dict) -> dict:
    return {"added": [k for k in new if k not in old], "removed": [k for k in old if k not in new],
            "changed": {k: _changes(old[k], new[k]) for k in old if k in new and _changes(old[k], new[k])}}


def _streams(a: Analysis) -> dict:
    rows = {r["stream"]: dict(r) for r in streams_table(a)}
    data = a.doc.data.get("streams", {})
    for name, row in rows.items():
        row.pop("stream")
        row["position"] = data.get(name, {}).get("position")
        for key, value in data.get(name, {}).items():  # every value written, e.g. cls_position, share, width
            row.setdefault(key, value)
    return rows


def _encoders(a: Analysis) -> dict:
    out = {}
    for node in a.graph.of_type(EncoderNode):
        e = node.decl
        out[node.id] = {"streams": list(e.streams), "width": e.sizes.width, "depth": e.sizes.depth, "heads": e.sizes.heads,
                        "mlp_dim": e.sizes.mlp_dim, "weights": e.weights,
                        "passes": [p for p in node.plans if p] or None,
                        "memory": {k: a.graph.spec.source.data["encoders"][e.name]["memory"][k] for k in e.memory} or None,
                        "sizes": {s: [z.width, z.depth, z.heads, z.mlp_dim] for s, z in e.stream_sizes.items()} or None,
                        "activation": e.activation, "norms": e.norms, "final_norm": e.final_norm, "bias": e.bias,
                        "norm_eps": e.norm_eps, "dropout": e.dropout, "pre_norm": e.pre_norm, "memory_norm": e.memory_norm,
                        "cross_mlp": e.cross_mlp}
    return out


def pair_encoders(a: Analysis, b: Analysis) -> list[tuple[str | None, str | None]]:
    """Encoders matched by name; those left over on both sides are matched in order (a rename)."""
    ea = [n.id for n in a.graph.of_type(EncoderNode)]
    eb = [n.id for n in b.graph.of_type(EncoderNode)]
    pairs = [(n, n) for n in ea if n in eb]
    left, right = [n for n in ea if n not in eb], [n for n in eb if n not in ea]
    pairs += list(zip(left, right))
    pairs += [(n, None) for n in left[len(right):]] + [(None, n) for n in right[len(left):]]
    return pairs


def how(attend, key: str) -> str:
    """How a query reads a key: ``(causal)``, ``(cross)``, ``via W``, or several; "" for plain attention."""
    parts = [f"via {attend.weights}"] if attend.weights not in ("shared", attend.query) else []
    if attend.causal and key == attend.query:
        parts.append("(causal)")
    if attend.cross:
        parts.append("(cross)")
    return " ".join(parts)


def visibility(plans: dict | None) -> dict:
    """(pass, query, key, how) -> set of layers in which the query stream reads the key stream that way."""
    out: dict[tuple, set] = {}
    for pname, plan in (plans or {}).items():
        for li, layer in enumerate(plan.layers):
            for a in layer.attends:
                for k in a.keys:
                    out.setdefault((pname, a.query, k, how(a, k)), set()).add(li)
    return out


def plans_at_depth(node: EncoderNode, analysis: Analysis, depth: int) -> dict | None:
    """The encoder's routing planned again for ``depth`` layers: what its rules say about layers it does
    not have (an open range `@ 4..` reaches them, `@ 4..8` does not). None if the rules do not fit."""
    spec = analysis.spec
    try:
        return {p: plan_pass(p, entries, node.streams, node.memory, node.decl.weights, depth, spec.rule_sets, spec.vars)
                for p, entries in node.decl.passes.items()}
    except SpecError:
        return None


def routing_diff(a: Analysis, b: Analysis) -> list[dict]:
    """One row per (encoder, pass, query, key, flags) whose layers differ: the layers gained and lost.
    When the depths differ, the shallower side's rules are planned again at the deeper depth, so a rule
    that changed in layers only one side has still shows, while rules that merely reach further do not."""
    rows = []
    nodes_a = {n.id: n for n in a.graph.of_type(EncoderNode)}
    nodes_b = {n.id: n for n in b.graph.of_type(EncoderNode)}
    for ea, eb in pair_encoders(a, b):
        na, nb = nodes_a.get(ea), nodes_b.get(eb)
        pa, pb = (na.plans if na else None), (nb.plans if nb else None)
        common = _common_depth(na, nb)
        if na and nb and _depth(na) != _depth(nb):
            deeper = max(_depth(na), _depth(nb))
            if _depth(na) < deeper:
                pa = plans_at_depth(na, a, deeper)
            else:
                pb = plans_at_depth(nb, b, deeper)
            if pa is None or pb is None:
                pa, pb = na.plans, nb.plans
            else:
                common = deeper
        va, vb = visibility(pa), visibility(pb)
        for key in list(va) + [k for k in vb if k not in va]:
            old, new = va.get(key, set()), vb.get(key, set())
            if {i for i in old if i < common} == {i for i in new if i < common}:
                continue  # differs only in layers one side does not have: the depth change says it
            pname, q, k, flags = key
            rows.append({"encoder": eb or ea if ea == eb or not (ea and eb) else f"{ea} -> {eb}", "pass": pname or None,
                         "query": q, "key": k, "flags": flags, "gained": layer_runs(new - old), "lost": layer_runs(old - new),
                         "before": layer_runs(old), "after": layer_runs(new)})
    return rows


def _depth(node: EncoderNode) -> int:
    return len(next(iter(node.plans.values())).layers)


def _common_depth(x: EncoderNode | None, y: EncoderNode | None) -> int:
    """Layers both encoders have (all of them when one side is missing)."""
    depth = [_depth(n) for n in (x, y) if n is not None]
    return min(depth) if len(depth) == 2 else max(depth)


def _exprs(a: Analysis, section: str) -> dict:
    return {k: {"expr": str(v)} for k, v in (a.doc.data.get(section) or {}).items()}


def _flat(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _components(a: Analysis) -> tuple[dict, dict]:
    params = by_component(a.graph, a.cost.params)
    flops = by_component(a.graph, a.cost.flops)
    return params, flops


def _deltas(old: dict, new: dict) -> dict:
    return {k: [old.get(k, 0), new.get(k, 0), new.get(k, 0) - old.get(k, 0)]
            for k in sorted(set(old) | set(new)) if old.get(k, 0) != new.get(k, 0)}


def diff_analyses(a: Analysis, b: Analysis, names: tuple[str, str] = ("a", "b")) -> dict:
    """The semantic difference from ``a`` to ``b`` as plain data."""
    pa, fa = _components(a)
    pb, fb = _components(b)
    renamed = {f"encoders.{x}": f"encoders.{y}" for x, y in pair_encoders(a, b) if x and y and x != y}
    pa, fa = ({renamed.get(k, k): v for k, v in side.items()} for side in (pa, fa))  # compare a renamed encoder with itself
    values = {s: _changes(_flat(a.doc.data.get(s) or {}), _flat(b.doc.data.get(s) or {})) for s in VALUE_SECTIONS}
    return {
        "a": {"ref": names[0], "name": a.spec.name, "params": a.cost.total_params, "flops": a.cost.total_flops},
        "b": {"ref": names[1], "name": b.spec.name, "params": b.cost.total_params, "flops": b.cost.total_flops},
        "streams": _table_diff(_streams(a), _streams(b)),
        "encoders": _encoder_diff(a, b),
        "routing": routing_diff(a, b),
        "outputs": _table_diff(_exprs(a, "outputs"), _exprs(b, "outputs")),
        "losses": _table_diff(_exprs(a, "losses"), _exprs(b, "losses")),
        "values": {s: v for s, v in values.items() if v},
        "params": _deltas(pa, pb),
        "flops": _deltas(fa, fb),
    }


def _encoder_diff(a: Analysis, b: Analysis) -> dict:
    ea, eb = _encoders(a), _encoders(b)
    out = {"added": [], "removed": [], "changed": {}, "renamed": {}}
    for x, y in pair_encoders(a, b):
        if x is None:
            out["added"].append(y)
        elif y is None:
            out["removed"].append(x)
        else:
            if x != y:
                out["renamed"][x] = y
            ch = _changes(ea[x], eb[y])
            if ch:
                out["changed"][y] = ch
    return out


def is_empty(d: dict) -> bool:
    sections = [d["streams"], d["encoders"], d["outputs"], d["losses"]]
    return not (any(s[k] for s in sections for k in s) or d["routing"] or d["values"] or d["params"] or d["flops"])


# ------------------------------------------------------------------------------------ rendering

def _signed(n: int) -> str:
    return ("+" if n > 0 else "-" if n < 0 else "") + _human(abs(n))


def _change(old: int, new: int) -> str:
    """``+1.20M, +3.4%`` (no percentage when the old value is zero)."""
    pct = f", {100 * (new - old) / old:+.1f}%" if old else ""
    return _signed(new - old) + pct


def _v(x) -> str:
    return "-" if x is None else str(x)


def render(d: dict):
    """A rich renderable of a diff: headline numbers first, then one block per changed section."""
    a, b = d["a"], d["b"]
    parts: list = [Text.assemble(("diff ", "bold"), f"{a['ref']} ({a['name']})", (" -> ", "bold"), f"{b['ref']} ({b['name']})"),
                   Text(f"parameters {_human(a['params'])} -> {_human(b['params'])} ({_change(a['params'], b['params'])}); "
                        f"forward FLOPs/sample {_human(a['flops'])} -> {_human(b['flops'])} ({_change(a['flops'], b['flops'])})")]
    if is_empty(d):
        parts.append(Text("no semantic differences", style="green"))
        return Group(*parts)
    for section in ("streams", "encoders", "outputs", "losses"):
        s = d[section]
        lines = Text()
        for name in s["added"]:
            lines.append(f"  + {name}\n", style="green")
        for name in s["removed"]:
            lines.append(f"  - {name}\n", style="red")
        for old, new in s.get("renamed", {}).items():
            lines.append(f"  ~ {old} -> {new} (renamed)\n", style="yellow")
        for name, changes in s["changed"].items():
            lines.append(f"  ~ {name}: ", style="yellow")
            lines.append("; ".join(f"{k} {_v(o)} -> {_v(n)}" for k, (o, n) in changes.items()) + "\n")
        if lines.plain:
            parts.append(Text(section, style="bold underline"))
            parts.append(lines)
    if d["routing"]:
        table = Table(title="routing: layers in which a query stream attends to a key stream", title_justify="left")
        for col in ("encoder", "query <- key", "before", "after", "gained", "lost"):
            table.add_column(col, no_wrap=col in ("encoder", "query <- key"))
        for r in d["routing"]:
            where = r["encoder"] + (f".{r['pass']}" if r["pass"] else "")
            table.add_row(where, f"{r['query']} <- {r['key']}" + (f" {r['flags']}" if r["flags"] else ""), r["before"] or "-", r["after"] or "-",
                          Text(r["gained"], style="green"), Text(r["lost"], style="red"))
        parts.append(table)
    if d["values"]:
        lines = Text()
        for section, changes in d["values"].items():
            for k, (o, n) in changes.items():
                lines.append(f"  {section}.{k}: {_v(o)} -> {_v(n)}\n")
        parts += [Text("values", style="bold underline"), lines]
    for key, title in (("params", "parameters"), ("flops", "forward FLOPs per sample")):
        if d[key]:
            table = Table(title=f"{title} by component", title_justify="left")
            for col in ("component", "before", "after", "change"):
                table.add_column(col, justify="left" if col == "component" else "right")
            for comp, (o, n, delta) in d[key].items():
                table.add_row(comp, _human(o), _human(n), Text(_signed(delta), style="green" if delta < 0 else "red"))
            parts.append(table)
    return Group(*parts)
