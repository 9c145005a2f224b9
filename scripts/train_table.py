"""Train every small paper variant on the embedded data and write docs/training-results.md.

    python scripts/train_table.py                 # all five, each with its spec's own `train:` settings
    python scripts/train_table.py tiny/zorro      # just one

Each run goes to runs/table/<spec>; the table shows, per spec, the steps, the wall time of the run
(data rendering, evaluation and checkpoints included) and its headline held-out metrics before and
after training, read from the run's summary.json.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

SPECS = ["tiny/zorro", "tiny/vatt", "tiny/mbt", "tiny/mammut", "tiny/cav-mae"]
ROOT = Path(__file__).resolve().parent.parent


def headline(metrics: dict) -> list[str]:
    """The metrics worth a row: R@1 of every contrastive pair (in the direction the loss names it;
    the reverse is in summary.json), classifier accuracy/mAP, reconstruction error and caption loss."""
    names = []
    pairs = [k[: -len(" R@1")] for k in metrics if k.endswith(" R@1")]
    names += [f"{p} R@1" for p in pairs[::2]]  # evaluation lists each pair as query->key, then key->query
    names += [k for k in metrics if k.endswith((" accuracy", " mAP"))]
    names += [k for k in ("reconstruction", "captioning") if k in metrics]
    return [n for n in names if n in metrics]


def run(spec: str) -> dict:
    run_dir = ROOT / "runs" / "table" / spec.replace("/", "-")
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    command = ["avdsl", "train", spec, "--run-dir", str(run_dir)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["command"] = " ".join(command[:3])
    summary["total_s"] = time.perf_counter() - start
    return summary


def fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(specs: list[str]) -> None:
    rows = []
    for spec in specs:
        s = run(spec)
        for i, name in enumerate(headline(s["final"])):
            before, after = s["baseline"].get(name), s["final"].get(name)
            chance = s["final"].get(name.replace("R@1", "chance_r1")) if name.endswith("R@1") else None
            note = f" ({after / chance:.1f}x chance)" if chance else ""
            first = i == 0
            cells = [f"`{spec}`", str(s["steps"]), f"{s['wall_time_s']:.0f} s"] if first else ["", "", ""]
            rows.append("| " + " | ".join(cells + [name, fmt(before), fmt(after) + note]) + " |")
    cpu = platform.processor() or platform.machine()
    text = "\n".join([
        "# Training results on the embedded data",
        "",
        "Each paper's small variant, trained by `avdsl train <spec>` with the settings in its spec's",
        "`train:` section on the embedded synthetic data (nothing downloaded), evaluated on the held-out",
        "split before and after training. Lower is better for reconstruction and captioning, higher for",
        "the rest. Wall time is the training call (evaluations and checkpoints included).",
        "",
        f"Made with `python scripts/train_table.py` on {cpu}, {os.cpu_count()} cores, torch {torch.__version__},"
        f" on {time.strftime('%Y-%m-%d')}.",
        "",
        "| spec | steps | wall time | held-out metric | before | after |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
        *rows,
        "",
    ])
    if set(specs) == set(SPECS):
        (ROOT / "docs" / "training-results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:] or SPECS)
