"""Does bf16w train like fp32 and bf16 autocast? One spec trained three times from the same seed and
data, one run per precision (`avdsl train`, eager), the loss curves drawn in one picture and the
held-out losses and step rates tabulated side by side.

    python -m benchmarks precision tiny/cav-mae --steps 300 [--out DIR]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "bf16w")


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def run(spec: str, steps: int, out: str | None) -> dict:
    root = Path(out or tempfile.mkdtemp(prefix="avdsl-precision-"))
    rows = []
    for precision in PRECISIONS:
        run_dir = root / precision
        command = [sys.executable, "-m", "avdsl", "train", spec, "--precision", precision, "--steps", str(steps),
                   "--no-compile", "--eval-every", str(max(1, steps // 6)), "--run-dir", str(run_dir), "--json"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"precision": precision, "run_dir": str(run_dir), "samples_per_s": summary["samples_per_s"],
                     "final_loss": summary["final"]["loss"], "baseline_loss": summary["baseline"]["loss"],
                     "train": [(r["step"], r["loss"]) for r in _records(run_dir, "train")],
                     "eval": [(r["step"], r["loss"]) for r in _records(run_dir, "eval")]})
    picture = root / "precision-curves.png"
    _plot(spec, rows, picture)
    return {"spec": spec, "steps": steps, "rows": rows, "picture": str(picture)}


def _plot(spec: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        line, = ax.plot(*zip(*row["train"]), label=f"{row['precision']} (train)", alpha=0.6)
        ax.plot(*zip(*row["eval"]), "o--", color=line.get_color(), label=f"{row['precision']} (held out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{spec}: fp32, bf16 autocast, bf16 weights with fp32 masters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(result: dict) -> str:
    lines = [f"{result['spec']}, {result['steps']} steps, eager, same seed and data",
             f"{'precision':<10}{'held-out loss':>15}{'(at step 0)':>13}{'samples/s':>11}"]
    for r in result["rows"]:
        lines.append(f"{r['precision']:<10}{r['final_loss']:>15.4f}{r['baseline_loss']:>13.4f}{r['samples_per_s']:>11.1f}")
    lines.append(f"curves: {result['picture']}")
    return "\n".join(lines)
