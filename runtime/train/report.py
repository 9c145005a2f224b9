"""What a run leaves behind: the metrics log, the curves plot, the summary file and table."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table


@dataclass
class RunSummary:
    """The outcome of one call of ``train`` (also written as ``run_dir/summary.json``)."""

    run_dir: str
    steps: int  # optimizer steps completed, counting those before a resume
    start_step: int  # the step this call started from (0, or the resumed checkpoint's step)
    target_steps: int
    wall_time_s: float  # of this call, including evaluation and checkpoints
    samples_per_s: float  # training samples (all processes) per second of this call's loop
    baseline: dict = field(default_factory=dict)  # metrics before training
    final: dict = field(default_factory=dict)  # metrics at the end
    skipped_files: int = 0  # items the data pipeline returned as None, whole run
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss, empty batch)
    interrupted: bool = False  # stopped early by SIGINT/SIGTERM, with a checkpoint written
    last_checkpoint: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class MetricsLog:
    """JSON lines in ``run_dir/metrics.jsonl`` (and TensorBoard scalars when it is installed).

    One object per line: ``{"kind": "train" | "eval", "step": int, <name>: float, ...}``.
    A resumed run first drops the lines past its starting step, which the interrupted run may have
    written after its last checkpoint, so the log reads as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, start_step: int, resumed: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        kept = read_metrics(self.path, up_to_step=start_step) if resumed else []
        temp = self.path.with_suffix(".jsonl.tmp")
        with open(temp, "w", encoding="utf-8") as handle:
            for record in kept:
                handle.write(json.dumps(record) + "\n")
        os.replace(temp, self.path)
        self.handle = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step)

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **{k: _plain(v) for k, v in values.items()}}
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.handle.close()
        if self.writer is not None:
            self.writer.close()


def _plain(value):
    """JSON has no NaN/inf: write them as strings so the log stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | os.PathLike, up_to_step: int | None = None) -> list[dict]:
    """The records of a metrics.jsonl file (skipping a torn last line), optionally up to a step."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if up_to_step is None or record.get("step", 0) <= up_to_step:
            records.append(record)
    return records


def write_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Plot training loss terms and evaluation metrics against step into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))

    def is_loss(name: str) -> bool:
        return name in ("loss", "reconstruction", "captioning") or name.startswith("loss/")

    def series(rows: list[dict], name: str) -> list[tuple]:
        return [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]

    for name in sorted({k for r in train for k in r if is_loss(k)}):
        if points := series(train, name):
            left.plot(*zip(*points), label=f"train {name}")
    for name in sorted({k for r in evals for k in r if is_loss(k)}):
        if points := series(evals, name):
            left.plot(*zip(*points), linestyle="--", marker="o", label=f"eval {name}")
    left.set(title="loss", xlabel="step")
    # rates in [0, 1] share one axis; ranks and chance levels would squash them, so they are left out
    skip = ("kind", "step")
    # R@5/R@10 follow R@1; plotting them too makes the panel unreadable (they are in metrics.jsonl)
    metric_names = sorted(
        {k for r in evals for k in r if k not in skip and not is_loss(k) and "rank" not in k and "chance" not in k
         and not k.endswith(("R@5", "R@10"))}
    )
    for name in metric_names:
        if points := series(evals, name):
            right.plot(*zip(*points), marker="o", label=name)
    right.set(title="evaluation", xlabel="step")
    for axes in (left, right):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    out_path = Path(out_path)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path


def write_summary(summary: RunSummary, path: str | os.PathLike) -> Path:
    """``summary.json``: the RunSummary as JSON."""
    path = Path(path)
    path.write_text(json.dumps({k: _plain_tree(v) for k, v in summary.to_dict().items()}, indent=2) + "\n")
    return path


def _plain_tree(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return _plain(value)


def summary_table(summary: RunSummary) -> Table:
    """A rich table: run figures, then each metric before and after training."""
    table = Table(title=f"run {summary.run_dir}", show_lines=False)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("steps", str(summary.start_step), str(summary.steps))
    table.add_row("wall time", "", f"{summary.wall_time_s:.1f} s")
    table.add_row("samples/s", "", f"{summary.samples_per_s:.1f}")
    table.add_row("skipped files", "", str(summary.skipped_files))
    table.add_row("skipped steps", "", str(summary.skipped_steps))
    if summary.interrupted:
        table.add_row("interrupted", "", "yes (checkpoint written)")
    # the headline metrics; R@5, R@10 and chance levels are in summary.json and metrics.jsonl
    for name in sorted(set(summary.baseline) | set(summary.final)):
        if name.endswith(("R@5", "R@10", "chance_r1")):
            continue
        after = _fmt(summary.final.get(name))
        chance = summary.final.get(name.replace("R@1", "chance_r1")) if name.endswith("R@1") else None
        if chance and isinstance(summary.final.get(name), float):
            after += f" ({summary.final[name] / chance:.1f}x chance)"
        table.add_row(name, _fmt(summary.baseline.get(name)), after)
    return table


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
