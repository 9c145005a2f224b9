"""A sweep's results: held-out metrics per grid point (mean and spread over seeds), parameters and
FLOPs, as a rich table, CSV, JSON and a plot of the headline metric against each swept key."""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from .sweep import Plan

# the metric a sweep is judged by, when none is named: the first of these kinds that the runs report
_HEADLINE_ORDER = (" mAP", " accuracy", "R@1", "reconstruction", "captioning", "loss")
PENDING = ("not run", "not finished")  # a run's "error" when it has simply not finished yet


def failures(pts: list["Point"]) -> list[str]:
    """The errors of runs that failed (not those that have not finished yet)."""
    return [r["error"] for p in pts for r in p.runs if "error" in r and r["error"] not in PENDING]


@dataclass
class Point:
    """One grid point: its runs (one per seed) and their final held-out metrics."""

    label: str
    assignment: tuple  # ((key, value text), ...)
    params: int
    flops: int
    runs: list[dict] = field(default_factory=list)  # {"seed", "run_dir", "final"} or {"seed", "run_dir", "error"}

    def values(self, metric: str) -> list[float]:
        return [r["final"][metric] for r in self.runs
                if isinstance(r.get("final", {}).get(metric), (int, float)) and math.isfinite(r["final"][metric])]

    def stats(self, metric: str) -> tuple[float, float, int]:
        """(mean, standard deviation over seeds (0 for one seed), number of seeds); NaN when none."""
        v = self.values(metric)
        if not v:
            return math.nan, math.nan, 0
        return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)


def points(plan: Plan, finals: dict[str, dict]) -> list[Point]:
    """Group the plan's runs by grid point; ``finals`` maps a run's name to its summary (or error)."""
    out: dict[str, Point] = {}
    for v in plan.variants:
        p = out.setdefault(v.point, Point(v.point, v.assignment, v.params, v.flops))
        p.runs.append({"seed": v.seed, "name": v.name, **finals.get(v.name, {"error": "not run"})})
    return list(out.values())


def metric_names(pts: list[Point]) -> list[str]:
    names: dict[str, None] = {}
    for p in pts:
        for r in p.runs:
            for k, v in r.get("final", {}).items():
                if isinstance(v, (int, float)):
                    names.setdefault(k)
    return list(names)


def headline(names: list[str]) -> str | None:
    for kind in _HEADLINE_ORDER:
        found = [n for n in names if n.endswith(kind) or n == kind.strip()]
        if found:
            return found[0]
    return names[0] if names else None


def shown_metrics(names: list[str]) -> list[str]:
    """The metrics a table shows: R@5/R@10, ranks and chance levels stay in the JSON, and so do the
    loss terms when there is one (it equals the total)."""
    terms = [n for n in names if n.startswith("loss/")]
    return [n for n in names if not n.endswith(("R@5", "R@10", "chance_r1")) and "rank" not in n
            and not (len(terms) == 1 and n in terms)]


def _fmt(mean: float, std: float, n: int) -> str:
    if n == 0:
        return "-"
    return f"{mean:.4g}" if n == 1 else f"{mean:.4g} ± {std:.2g}"


def table(plan: Plan, pts: list[Point], main: str | None) -> Table:
    metrics = shown_metrics(metric_names(pts))
    if main in metrics:
        metrics = [main] + [m for m in metrics if m != main]
    shown = plan.spec if plan.spec != "-" else plan.variants[0].analysis.spec.name
    t = Table(title=f"sweep of {shown}: held-out metrics, mean ± std over seeds")
    for a in plan.axes:
        t.add_column(a.label)
    t.add_column("seeds", justify="right")
    t.add_column("params", justify="right")
    t.add_column("GFLOPs", justify="right")
    for m in metrics:
        t.add_column(m + (" *" if m == main else ""), justify="right")
    for p in pts:
        pending = sum(r.get("error") in PENDING for r in p.runs)
        failed = sum("error" in r for r in p.runs) - pending
        row = [v for _, v in p.assignment]
        row += [str(len(p.runs) - failed - pending) + (f" ({failed} failed)" if failed else "")
                + (f" ({pending} unfinished)" if pending else ""),
                f"{p.params:,}", f"{p.flops / 1e9:.3f}"]
        row += [_fmt(*p.stats(m)) for m in metrics]
        t.add_row(*row)
    return t


def to_json(plan: Plan, pts: list[Point], main: str | None) -> dict:
    names = metric_names(pts)

    def plain(x):
        return None if isinstance(x, float) and not math.isfinite(x) else x

    return {
        "spec": plan.spec,
        "grid": {a.key: list(a.texts) for a in plan.axes},
        "headline": main,
        "points": [{
            "assignment": dict(p.assignment),
            "params": p.params,
            "flops": p.flops,
            "metrics": {m: dict(zip(("mean", "std", "n"), map(plain, p.stats(m)))) for m in names},
            "runs": [{k: (v if k != "final" else {a: plain(b) for a, b in v.items()}) for k, v in r.items()} for r in p.runs],
        } for p in pts],
    }


def write_csv(path: Path, plan: Plan, pts: list[Point]) -> Path:
    names = metric_names(pts)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
        w.writerow([a.key for a in plan.axes] + ["seeds", "params", "flops"]
                   + [f"{m} {s}" for m in names for s in ("mean", "std")])
        for p in pts:
            row = [v for _, v in p.assignment] + [len(p.values(names[0])) if names else 0, p.params, p.flops]
            for m in names:
                mean, std, n = p.stats(m)
                row += ["" if n == 0 else f"{mean:.6g}", "" if n == 0 else f"{std:.6g}"]
            w.writerow(row)
    return path


def write_json(path: Path, plan: Plan, pts: list[Point], main: str | None) -> Path:
    path.write_text(json.dumps(to_json(plan, pts, main), indent=2) + "\n", encoding="utf-8")
    return path


def plot(path: Path, plan: Plan, pts: list[Point], main: str) -> Path:
    """One panel per swept key: the headline metric (mean, error bar = std over seeds) at each of
    the key's values, one line per combination of the other keys' values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_ = plan.axes or []
    figure, panels = plt.subplots(1, max(1, len(axes_)), figsize=(5 * max(1, len(axes_)), 4), squeeze=False)
    for panel, axis in zip(panels[0], axes_):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in axis.values)
        xs = list(axis.values) if numeric else list(range(len(axis.values)))
        others: dict[tuple, list] = {}
        for p in pts:
            rest = tuple((k, v) for k, v in p.assignment if k != axis.key)
            others.setdefault(rest, []).append(p)
        for rest, group in others.items():
            by_value = {dict(p.assignment)[axis.key]: p.stats(main) for p in group}
            line = [(x, *by_value[t][:2]) for x, t in zip(xs, axis.texts) if t in by_value and by_value[t][2]]
            if not line:
                continue
            x, mean, std = zip(*line)
            label = ", ".join(f"{k.removeprefix('vars.')}={v}" for k, v in rest) or None
            panel.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label)
        if not numeric:
            panel.set_xticks(xs, list(axis.texts))
        else:
            panel.set_xticks(xs)
        panel.set(xlabel=axis.label, ylabel=main, title=f"{main} vs {axis.label}")
        panel.grid(alpha=0.3)
        if panel.get_legend_handles_labels()[0]:
            panel.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
