"""`avdsl sweep`: grids as located errors, resuming a half-finished sweep, and the vectorized
ensemble's members training exactly as lone runs do."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.runtime.train import TrainConfig, train
from avdsl.runtime.train.ensemble import Member, train_ensemble
from avdsl.runtime.trial import random_batch
from avdsl.sweep import parse_grid, plan_sweep

SMALL = ["--train-size", "16", "--val-size", "8", "--batch-size", "4", "--eval-every", "0", "--set", "train.eval_batches=2"]


@pytest.mark.parametrize("grid, where, message", [
    ("vars.fusion_layer", "<--grid>:1:1", "has no '='"),
    ("vars.fusion_layer=0,,1", "<--grid>:1:21", "empty value"),
    ("vars.fusion_layr=0,1", "<--grid>:1:1", "no var 'fusion_layr'"),
    ("encoders.mbt.depth=1,x", "<--grid>:1:22", "must be an integer"),
    ("encoders.mbt.depht=1,2", "<--grid>:1:20", "unknown key 'depht'"),
    ("train.lr=1e-3,abc", "<--grid>:1:15", "must be a number"),
    ("vars.fusion_layer=0,1,1", "<--grid>:1:23", "listed twice"),
    ("vars.fusion_layer=0,5", "mbt.yaml:", "does not fit an encoder of depth 2"),  # found by the build, in the spec
])
def test_bad_grid_is_one_located_error_before_any_run(run_cli, tmp_path, grid, where, message):
    code, out, err = run_cli("sweep", "tiny/mbt", "--grid", grid, "--run-dir", str(tmp_path / "sweep"), *SMALL)
    assert code == 2, err
    assert where in err and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "sweep").exists()  # nothing trained


def test_second_grid_is_located_on_its_own_line_and_variant_is_named(run_cli, tmp_path):
    code, _, err = run_cli("sweep", "tiny/mbt", "--grid", "vars.fusion_layer=0,1", "--grid", "train.lr=[1, 2]",
                           "--run-dir", str(tmp_path / "s"))
    assert code == 2
    assert "<--grid>:2:10: train.lr must be a number" in err
    assert "2 | train.lr=[1, 2]" in err  # the argument is shown with a caret under the value
    assert "in the sweep variant vars.fusion_layer=0, train.lr=[1, 2]" in err


def test_sweep_options_are_bounded_before_anything_runs(run_cli, tmp_path):
    code, _, err = run_cli("sweep", "tiny/mbt", "--seeds", "0", "--run-dir", str(tmp_path / "s"))
    assert code == 2 and "--seeds 0: expected 1 to 64" in err
    code, _, err = run_cli("sweep", "tiny/mbt", "--grid", "train.lr=" + ",".join(f"{i}.0" for i in range(1, 65)),
                           "--seeds", "8", "--run-dir", str(tmp_path / "s"))
    assert code == 2 and "the sweep asks for 512 runs, more than 256" in err
    assert not (tmp_path / "s").exists()


def test_grid_values_and_variants():
    axes = parse_grid(["vars.fusion_layer=0,1", "train.lr=1e-3,'a,b',[1, 2]"])
    assert axes[0].values == (0, 1)
    assert axes[1].values == (0.001, "a,b", [1, 2])  # 1e-3 is a number; commas inside quotes/brackets stay
    plan = plan_sweep("tiny/mbt", parse_grid(["vars.fusion_layer=0,1"]), seeds=2)
    assert [v.name for v in plan.variants] == ["fusion_layer=0-seed=0", "fusion_layer=0-seed=1",
                                               "fusion_layer=1-seed=0", "fusion_layer=1-seed=1"]
    assert plan.variants[0].flops > plan.variants[2].flops  # earlier fusion: more attention pairs


def test_half_finished_sweep_resumes_and_skips_finished_runs(run_cli, tmp_path):
    root = tmp_path / "sweep"
    args = ["sweep", "tiny/mbt", "--grid", "encoders.mbt.depth=1,2", "--seeds", "2", "--steps", "4",
            "--set", "train.checkpoint_every=2", "--run-dir", str(root), "--json", *SMALL]
    code, out, err = run_cli(*args)
    assert code == 0, err
    err = " ".join(err.split())
    assert "ensemble of 2: encoders.mbt.depth=1-seed=0, encoders.mbt.depth=1-seed=1" in err  # one model, two seeds
    first = json.loads(out)
    assert [p["assignment"] for p in first["points"]] == [{"encoders.mbt.depth": "1"}, {"encoders.mbt.depth": "2"}]
    assert all(p["metrics"]["logits mAP"]["n"] == 2 for p in first["points"])
    assert (root / "sweep.png").stat().st_size > 5_000 and (root / "sweep.csv").is_file()

    # cut the depth=2 runs back to their step-2 checkpoints, as if the sweep had been killed there
    for seed in (0, 1):
        run = root / f"encoders.mbt.depth=2-seed={seed}"
        shutil.rmtree(run / "step-000004")
        (run / "summary.json").unlink()
    finished = root / "encoders.mbt.depth=1-seed=0" / "summary.json"
    before = finished.stat().st_mtime_ns

    code, out, err = run_cli(*args)
    assert code == 0, err
    err = " ".join(err.split())
    assert "(2 finished earlier)" in err
    assert "ensemble of 2: encoders.mbt.depth=2-seed=0, encoders.mbt.depth=2-seed=1, resuming at step 2" in err
    assert "encoders.mbt.depth=1-seed=0," not in err  # in no unit
    assert finished.stat().st_mtime_ns == before  # a finished run is not trained again
    for seed in (0, 1):
        summary = json.loads((root / f"encoders.mbt.depth=2-seed={seed}" / "summary.json").read_text())
        assert (summary["start_step"], summary["steps"]) == (2, 4)
    second = json.loads(out)
    assert second["points"][0] == first["points"][0]


class _Items:
    """A small data set of random items of a model's inputs (fast to make, fixed by its seed)."""

    def __init__(self, inputs, size: int, seed: int):
        batch = random_batch(inputs, size, torch.Generator().manual_seed(seed))
        self.items = [{k: v[i] for k, v in batch.items()} for i in range(size)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _member(graph, seed: int, lr: float, run_dir) -> Member:
    torch.manual_seed(seed)
    model = compile_graph(graph)
    config = TrainConfig(steps=3, batch_size=4, lr=lr, warmup_steps=1, seed=seed, eval_every=0, eval_batches=1,
                         checkpoint_every=0, log_every=1, run_dir=str(run_dir), device="cpu")
    return Member(model, _Items(model.inputs, 16, seed), _Items(model.inputs, 4, seed + 100), config,
                  model.spec_text, model.spec_hash)


def _losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_ensemble_members_train_as_their_lone_runs(tmp_path):
    analysis = analyse("tiny/zorro")  # no random operations: equal step for step
    settings = [(0, 2e-3), (1, 5e-3)]  # members differ in seed (weights, data order) and learning rate
    members = [_member(analysis.graph, s, lr, tmp_path / f"ens{s}") for s, lr in settings]
    summaries = train_ensemble(members)
    for (seed, lr), member, summary in zip(settings, members, summaries):
        lone = _member(analysis.graph, seed, lr, tmp_path / f"lone{seed}")
        train(lone.model, lone.train_set, lone.val_set, lone.config, lone.spec_text, lone.spec_hash, on_step=lambda *_: None)
        assert _losses(tmp_path / f"ens{seed}") == pytest.approx(_losses(tmp_path / f"lone{seed}"), rel=1e-4)
        # batched matmuls round differently; Adam's first steps move an element by about lr whatever its
        # gradient's size, so weights agree to a small fraction of one step (lr 2e-3), losses to 1e-4
        for (name, a), (_, b) in zip(member.model.state_dict().items(), lone.model.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
        assert summary.final["loss"] == pytest.approx(json.loads((tmp_path / f"lone{seed}" / "summary.json").read_text())["final"]["loss"], rel=1e-4)
    assert _losses(tmp_path / "ens0") != pytest.approx(_losses(tmp_path / "ens1"))  # the members did differ


def test_ensemble_refuses_members_of_different_models(tmp_path):
    a = _member(analyse("tiny/mbt").graph, 0, 1e-3, tmp_path / "a")
    b = _member(analyse("tiny/mbt", ["encoders.mbt.depth=1"]).graph, 0, 1e-3, tmp_path / "b")
    with pytest.raises(ValueError, match="same parameters"):
        train_ensemble([a, b])
