"""`avdsl sweep`: train a grid of variants of a spec and compare their held-out metrics.

Every variant is validated and costed before anything trains (`avdsl.sweep`); runs whose models are
identical train together as one vectorized ensemble (`avdsl.runtime.train.ensemble`), the others one
after another (or in ``--jobs`` processes), each with `avdsl train`'s own loop, into a run directory
of its own. Running the same command again skips finished runs and resumes unfinished ones.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import queue as queue_module
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import sweep_report
from ..api import analyse_doc
from ..diagnostics import SpecError, did_you_mean
from ..loader import load_text
from ..sweep import MAX_SEEDS, Variant, diagnostic_sources, group_key, parse_grid, plan_sweep
from .common import EXIT_FINDINGS, EXIT_INTERRUPTED, SPEC_HELP, CommandError, complete_spec, err, out
from .train import TRAIN_DEFAULTS, _config, _datasets

MAX_JOBS = 32


@dataclass
class Run:
    """One variant with its resolved training settings and where it stands."""

    variant: Variant
    config: dict  # TrainConfig fields
    sizes: dict  # train_size, val_size
    start: int = 0  # the step a resumed run starts from
    done: bool = False

    @property
    def payload(self) -> dict:
        """What a (possibly other) process needs to build and train this run."""
        doc = self.variant.analysis.doc
        return {"name": self.variant.name, "text": doc.resolved_text(), "file": doc.file, "config": self.config, "sizes": self.sizes}


def _status(run: Run) -> None:
    """Finished, resumable at some step, or new; a run directory of another spec is an error."""
    from ..runtime.train.checkpoint import find_latest, read_meta

    folder = Path(run.config["run_dir"])
    latest = find_latest(folder)
    if latest is None:
        return
    meta = read_meta(latest)
    expected = run.variant.analysis.doc.hash()
    if meta.get("spec_hash") != expected:
        raise CommandError(f"{folder} holds a run of another spec (hash {meta.get('spec_hash')}, this variant's is {expected})",
                           "pass another --run-dir, or remove the old run")
    run.start = int(meta.get("step", 0))
    summary = folder / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        run.done = not s.get("interrupted") and s.get("steps", 0) >= run.config["steps"] and run.start >= run.config["steps"]


def _units(runs: list[Run], ensemble: bool, data: str) -> list[list[Run]]:
    """Pending runs, grouped: runs of one model at the same step form an ensemble when allowed."""
    pending = [r for r in runs if not r.done]
    if not ensemble or data != "synthetic":
        return [[r] for r in pending]
    groups: dict[tuple, list[Run]] = {}
    for r in pending:
        groups.setdefault((r.variant.group, r.start), []).append(r)
    return list(groups.values())


class _Memo:
    """A data set whose items are rendered once, when first read (variants with one seed share it)."""

    def __init__(self, inner):
        self.inner, self.items = inner, {}

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        if i not in self.items:
            self.items[i] = self.inner[i]
        return self.items[i]


def _train_unit(unit: list[dict], data: str, on_step, console: Console, cache: dict) -> list[dict]:
    """Build and train one unit (a lone run or an ensemble); each run's summary or error. ``cache``
    keeps data sets between units of one process: runs with the same seed read the same clips."""
    import torch

    from ..compiler import compile_graph
    from ..runtime.train import NonFiniteLoss, TrainConfig, train
    from ..runtime.train.ensemble import Member, train_ensemble

    members = []
    for r in unit:
        analysis = analyse_doc(load_text(r["text"], r["file"]))  # the variant as validated (same text, same hash)
        config = TrainConfig.from_dict(r["config"])
        torch.manual_seed(config.seed)
        model = compile_graph(analysis.graph)
        key = (repr(model.inputs), config.seed, r["sizes"]["train_size"], r["sizes"]["val_size"])
        if key not in cache:
            train_set, val_set = _datasets(model, data, r["sizes"]["train_size"], r["sizes"]["val_size"], config.seed, False)
            cache[key] = (_Memo(train_set), _Memo(val_set)) if data == "synthetic" else (train_set, val_set)
        members.append(Member(model, *cache[key], config, model.spec_text, model.spec_hash))
    if len(members) == 1:
        m = members[0]
        try:
            results = [train(m.model, m.train_set, m.val_set, m.config, m.spec_text, m.spec_hash, console=console, on_step=on_step)]
        except NonFiniteLoss as e:
            results = [e]
    else:
        results = train_ensemble(members, on_step=on_step)
    return [{"name": r["name"], **({"error": str(res)} if isinstance(res, Exception) else {"summary": res.to_dict()})}
            for r, res in zip(unit, results)]


def _worker(unit: list[dict], data: str, threads: int, updates, index: int) -> list[dict]:
    """A unit in a process of its own (`--jobs`): progress goes back through a queue."""
    import torch

    torch.set_num_threads(threads)
    return _train_unit(unit, data, lambda step, info: updates.put((index, step, info)), Console(quiet=True), {})


def _label(unit: list[Run]) -> str:
    if len(unit) == 1:
        return unit[0].variant.name
    seeds = sorted({r.variant.seed for r in unit})
    points = list(dict.fromkeys(r.variant.point for r in unit))
    return f"ensemble of {len(unit)}: {'; '.join(points)[:60]} (seeds {seeds[0]}..{seeds[-1]})"


def _execute(units: list[list[Run]], data: str, jobs: int) -> tuple[dict, bool]:
    """Train every unit with one live view; returns {run name: result} and whether it was interrupted."""
    results: dict[str, dict] = {}
    interrupted = False
    cache: dict = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        total = sum(len(u) * (u[0].config["steps"] - u[0].start) for u in units)
        overall = progress.add_task("[bold]sweep", total=total, info=f"{sum(map(len, units))} runs in {len(units)} units")
        tasks = [progress.add_task(_label(u), total=u[0].config["steps"], completed=u[0].start, info="", visible=False)
                 for u in units]
        done_steps = [u[0].start for u in units]

        def update(index: int, step: int, info: str) -> None:
            unit = units[index]
            progress.update(tasks[index], completed=step, info=info, visible=True)
            progress.advance(overall, len(unit) * (step - done_steps[index]))
            done_steps[index] = step

        def finish(index: int, unit_results: list[dict]) -> None:
            nonlocal interrupted
            for r in unit_results:
                results[r["name"]] = r
                interrupted |= bool(r.get("summary", {}).get("interrupted"))
            progress.update(tasks[index], visible=False)

        if jobs == 1:
            for index, unit in enumerate(units):
                progress.update(tasks[index], visible=True)
                finish(index, _train_unit([r.payload for r in unit], data,
                                          lambda s, i, index=index: update(index, s, i), progress.console, cache))
                if interrupted:
                    break
            return results, interrupted
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            updates = manager.Queue()
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                futures = {pool.submit(_worker, [r.payload for r in unit], data, threads, updates, index): index
                           for index, unit in enumerate(units)}
                pending = set(futures)
                try:
                    while pending:
                        finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                        _drain(updates, update)
                        for f in finished:
                            finish(futures[f], f.result())
                except KeyboardInterrupt:
                    interrupted = True
                    for f in pending:
                        f.cancel()
                    for f in wait(pending).done:  # running units checkpoint and stop on the same Ctrl-C
                        if not f.cancelled() and f.exception() is None:
                            finish(futures[f], f.result())
                _drain(updates, update)
    return results, interrupted


def _drain(updates, update) -> None:
    while True:
        try:
            update(*updates.get_nowait())
        except queue_module.Empty:
            return


def _finals(runs: list[Run], results: dict) -> dict:
    """Each run's final metrics (from its summary.json) or the error that stopped it."""
    finals = {}
    for r in runs:
        name = r.variant.name
        if "error" in results.get(name, {}):
            finals[name] = {"run_dir": r.config["run_dir"], "error": results[name]["error"]}
            continue
        path = Path(r.config["run_dir"]) / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else None
        if summary is None or summary.get("interrupted") or summary.get("steps", 0) < r.config["steps"]:
            finals[name] = {"run_dir": r.config["run_dir"], "error": "not finished"}
        else:
            finals[name] = {"run_dir": r.config["run_dir"], "final": summary.get("final", {})}
    return finals


def sweep_command(
    spec: str = typer.Argument(..., help=SPEC_HELP, autocompletion=complete_spec),
    grid: Optional[List[str]] = typer.Option(None, "--grid", help="KEY=V1,V2,...: a spec key (as for --set) and its values (repeatable; the sweep is their product)."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per variant (the spec's seed, +1, ...)."),
    jobs: int = typer.Option(1, "--jobs", help="Processes training units of the sweep at once."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps of every run (default: the spec's)."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="The sweep's folder: one run directory per variant, and the results (default runs/sweep-NAME)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a spec value in every variant (repeatable)."),
    data: str = typer.Option("synthetic", "--data", help="`synthetic` (embedded, generated) or a .csv/.jsonl manifest of media files."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate each run every N steps (a final evaluation always runs)."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile lone runs (ensembles run eagerly)."),
    ensemble: bool = typer.Option(True, "--ensemble/--no-ensemble", help="Train runs of one model together as a vectorized ensemble."),
    metric: Optional[str] = typer.Option(None, "--metric", help="The headline metric of the table and plot (default: accuracy/mAP, else R@1, else reconstruction)."),
    train_size: Optional[int] = typer.Option(None, "--train-size", help="Synthetic clips in the training split."),
    val_size: Optional[int] = typer.Option(None, "--val-size", help="Synthetic clips in the held-out split."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda ..."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON (progress goes to stderr)."),
) -> None:
    """Train every variant of a grid and compare them: held-out metrics (mean ± std over seeds),
    parameters and FLOPs as a table, sweep.csv, sweep.json and sweep.png (the headline metric
    against each swept key) in the sweep's folder. Run the same command again to resume.

    Examples:

      avdsl sweep tiny/mbt --grid vars.fusion_layer=0,1,2 --seeds 2 --steps 60

      avdsl sweep tiny/zorro --grid train.lr=1e-3,3e-3 --seeds 4

      avdsl sweep tiny/mbt --grid encoders.mbt.depth=1,2 --grid vars.fusion_layer=0,1 --jobs 2
    """
    items = grid or []
    if not 1 <= jobs <= MAX_JOBS:
        raise CommandError(f"--jobs {jobs}: expected 1 to {MAX_JOBS}", "e.g. `--jobs 2`")
    if not 1 <= seeds <= MAX_SEEDS:
        raise CommandError(f"--seeds {seeds}: expected 1 to {MAX_SEEDS}", "e.g. `--seeds 4`")
    try:
        plan = plan_sweep(spec, parse_grid(items), seeds, set_ or [])
    except SpecError as e:
        raise e.with_sources(diagnostic_sources(items)) from None  # shows the --grid argument under the caret
    from ..runtime.train.ensemble import MEMBER_SETTINGS  # after the checks: this imports torch

    root = Path(run_dir or Path("runs") / f"sweep-{plan.variants[0].analysis.spec.name.replace('/', '-')}")
    runs = []
    for v in plan.variants:
        sizes = {k: (train_size if k == "train_size" else val_size) or v.train.get(k, d) for k, d in TRAIN_DEFAULTS.items()}
        options = {"steps": steps, "batch_size": batch_size, "compile": compile_, "eval_every": eval_every, "device": device,
                   "seed": v.seed, "run_dir": str(root / v.name), "resume": True}
        config = _config(v.train, options).to_dict()
        v.group = group_key(v.analysis.graph, {**config, **sizes, "data": data}, MEMBER_SETTINGS + ("resume",))
        runs.append(Run(v, config, sizes))
        _status(runs[-1])

    units = _units(runs, ensemble, data)
    shown = err if as_json else out
    done = sum(r.done for r in runs)
    shown.print(f"sweep [bold]{plan.variants[0].analysis.spec.name}[/]: {len(plan.points())} variants x {seeds} seed(s) = "
                f"{len(runs)} runs -> {root}" + (f" ({done} finished earlier)" if done else ""))
    for unit in units:
        start = f", resuming at step {unit[0].start}" if unit[0].start else ""
        kind = f"ensemble of {len(unit)}" if len(unit) > 1 else "lone run"
        shown.print(f"  {kind}: {', '.join(r.variant.name for r in unit)}{start}", highlight=False)
    results, interrupted = _execute(units, data, jobs) if units else ({}, False)

    pts = sweep_report.points(plan, _finals(runs, results))
    names = sweep_report.metric_names(pts)
    if metric is not None and names and metric not in names:
        raise CommandError(f"--metric '{metric}' is not a metric of these runs", did_you_mean(metric, names, "a metric"))
    main = metric or sweep_report.headline(names)
    root.mkdir(parents=True, exist_ok=True)
    sweep_report.write_csv(root / "sweep.csv", plan, pts)
    sweep_report.write_json(root / "sweep.json", plan, pts, main)
    if main is not None and plan.axes:
        sweep_report.plot(root / "sweep.png", plan, pts, main)
    if as_json:
        print(json.dumps(sweep_report.to_json(plan, pts, main), indent=2))
    else:
        out.print(sweep_report.table(plan, pts, main))
        out.print(f"results: {root / 'sweep.csv'}, {root / 'sweep.json'}" + (f", {root / 'sweep.png'}" if plan.axes else ""),
                  highlight=False)
    for p in pts:
        for r in p.runs:
            if r.get("error") and r["error"] not in sweep_report.PENDING:
                err.print(f"[bold red]failed[/]: {r['name']}: {r['error']}", highlight=False)
    if interrupted:
        err.print("interrupted: run the same command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED)
    if sweep_report.failures(pts):
        raise typer.Exit(EXIT_FINDINGS)

