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
from avdsl.runtime.encoder import Dropout
from avdsl.runtime.train.ensemble import Member, Vectorized, train_ensemble
from avdsl.runtime.trial import random_batch
from avdsl.sweep import model_key, parse_grid, plan_sweep

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


def test_jobs_train_units_in_processes_of_their_own_with_the_results_of_one_process(run_cli, tmp_path):
    results = {}
    for jobs in (1, 2):
        args = ["sweep", "tiny/mbt", "--grid", "encoders.mbt.depth=1,2", "--steps", "2", "--jobs", str(jobs),
                "--run-dir", str(tmp_path / f"jobs{jobs}"), "--json", *SMALL]
        code, out, err = run_cli(*args)
        assert code == 0, err
        results[jobs] = json.loads(out)["points"]
        for depth in (1, 2):
            assert (tmp_path / f"jobs{jobs}" / f"encoders.mbt.depth={depth}-seed=0" / "summary.json").is_file()
    for one, two in zip(results[1], results[2]):  # the same runs; 1 thread per process rounds differently
        assert one["assignment"] == two["assignment"]
        assert two["metrics"]["loss"]["mean"] == pytest.approx(one["metrics"]["loss"]["mean"], rel=1e-4)


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


HALF_FUSION = "losses.contrastive=nce(za, zv, tau=0.08) + 0.5 * nce(za, zf, tau=0.08) + 0.25 * nce(zv, zf, tau=0.08)"


def test_ensemble_members_train_as_their_lone_runs(tmp_path):
    # no random operations: equal step for step. The members differ in seed (weights, data order),
    # learning rate and loss weights (the model's `loss_weights` buffer, stacked like its parameters)
    settings = [(0, 2e-3, []), (1, 5e-3, [HALF_FUSION])]
    graphs = [analyse("tiny/zorro", sets).graph for _, _, sets in settings]
    members = [_member(g, s, lr, tmp_path / f"ens{s}") for g, (s, lr, _) in zip(graphs, settings)]
    assert members[1].model.loss_weights.tolist() == [1.0, 0.5, 0.25]
    summaries = train_ensemble(members)
    for graph, (seed, lr, _), member, summary in zip(graphs, settings, members, summaries):
        lone = _member(graph, seed, lr, tmp_path / f"lone{seed}")
        train(lone.model, lone.train_set, lone.val_set, lone.config, lone.spec_text, lone.spec_hash, on_step=lambda *_: None)
        assert _losses(tmp_path / f"ens{seed}") == pytest.approx(_losses(tmp_path / f"lone{seed}"), rel=1e-4)
        # batched matmuls round differently; Adam's first steps move an element by about lr whatever its
        # gradient's size, so weights agree to a small fraction of one step (lr 2e-3), losses to 1e-4
        for (name, a), (_, b) in zip(member.model.state_dict().items(), lone.model.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
        assert summary.final["loss"] == pytest.approx(json.loads((tmp_path / f"lone{seed}" / "summary.json").read_text())["final"]["loss"], rel=1e-4)
    assert _losses(tmp_path / "ens0") != pytest.approx(_losses(tmp_path / "ens1"))  # the members did differ


def test_ensemble_members_drop_out_at_their_own_rates():
    rates = (0.0, 0.5)
    models = []
    for rate in rates:
        torch.manual_seed(0)  # the same weights: only the dropout rate differs
        models.append(compile_graph(analyse("tiny/zorro", [f"encoders.backbone.dropout={rate}"]).graph).train())
    batch = random_batch(models[0].inputs, 4, torch.Generator().manual_seed(0))
    stacked = {k: torch.stack([v, v]) for k, v in batch.items()}
    loss, _ = Vectorized(models)(stacked)
    assert loss[0].item() == pytest.approx(models[0](**batch)["loss"].item(), rel=1e-5)  # rate 0: no dropout at all
    assert loss[1].item() != pytest.approx(loss[0].item(), rel=1e-3)  # rate 0.5 drops, from the same weights
    site = next(m for m in models[1].modules() if isinstance(m, Dropout))
    assert site.per_member and site.rate.item() == 0.5
    x = torch.ones(20000)
    dropped = site(x)  # a member's own rate: about half the values zeroed, the rest scaled by 1 / (1 - 0.5)
    assert set(dropped.unique().tolist()) == {0.0, 2.0} and (dropped == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_variants_differing_in_loss_weights_or_dropout_share_one_ensemble():
    axis, = parse_grid(["losses.contrastive=0.5 * nce(za, zv, tau=0.08),nce(za, zv, tau=0.08)"])  # commas in calls stay
    assert axis.values == ("0.5 * nce(za, zv, tau=0.08)", "nce(za, zv, tau=0.08)")
    key = lambda *sets: model_key(analyse("tiny/zorro", list(sets)).graph)  # noqa: E731
    assert key() == key("train.seed=3") == key(HALF_FUSION) == key("encoders.backbone.dropout=0.2")
    assert key() != key("encoders.backbone.depth=1")  # another model
    assert key() != key("losses.contrastive=nce(za, zv, tau=0.07) + nce(za, zf, tau=0.08) + nce(zv, zf, tau=0.08)")  # tau is code


def test_ensemble_refuses_members_of_different_models(tmp_path):
    a = _member(analyse("tiny/mbt").graph, 0, 1e-3, tmp_path / "a")
    b = _member(analyse("tiny/mbt", ["encoders.mbt.depth=1"]).graph, 0, 1e-3, tmp_path / "b")
    with pytest.raises(ValueError, match="same parameters"):
        train_ensemble([a, b])
