"""The training loop on a tiny contract-following model: learning, exact resume, failure modes."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from avdsl.runtime.train import (
    CheckpointMismatch,
    NonFiniteLoss,
    TrainConfig,
    evaluate,
    find_latest,
    load_checkpoint,
    train,
)
from avdsl.runtime.train.loop import param_groups
from avdsl.runtime.train.sampling import batch_indices
from avdsl.runtime.train.schedule import lr_factor, make_scheduler
from avdsl.runtime.train.toy import TinyAV, ToyAVDataset

SPEC, HASH = "model: tiny\n", "tinyhash"
REPO = Path(__file__).resolve().parents[1]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def config(run_dir, **overrides) -> TrainConfig:
    values = dict(
        steps=10, batch_size=16, lr=3e-3, weight_decay=0.05, warmup_steps=2, min_lr_ratio=0.1,
        grad_clip=1.0, eval_every=0, eval_batches=2, checkpoint_every=0, log_every=1,
        run_dir=str(run_dir), device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def run(run_dir, model=None, train_set=None, **overrides):
    torch.manual_seed(0)
    model = model if model is not None else TinyAV()
    summary = train(
        model, train_set or ToyAVDataset(256), ToyAVDataset(64, seed=1),
        config(run_dir, **overrides), SPEC, HASH, console=quiet(),
    )
    return model, summary


def records(run_dir, kind):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ------------------------------------------------------------------ pure pieces


def test_lr_factor_by_hand():
    # warmup 4, total 14, floor 0.1: steps 0..3 rise 1/4..1, then half a cosine over 10 steps
    assert [lr_factor(s, 4, 14, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 14, 0.1) == 1.0
    assert lr_factor(9, 4, 14, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos = 0
    assert lr_factor(14, 4, 14, 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 4, 14, 0.1) == pytest.approx(0.1)  # stays at the floor
    assert lr_factor(0, 0, 10, 0.0) == 1.0
    assert lr_factor(5, 0, 10, 0.0) == pytest.approx(0.5)


def test_scheduler_drives_optimizer_lr():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=2.0)
    scheduler = make_scheduler(optimizer, warmup_steps=2, total_steps=6, min_lr_ratio=0.0)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([1.0, 2.0, 2.0, 2.0 * 0.5 * (1 + math.cos(math.pi / 4)), 1.0,
                                  2.0 * 0.5 * (1 + math.cos(3 * math.pi / 4))])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="on_nonfinite"):
        TrainConfig(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="unknown training settings \\['stepz'\\]"):
        TrainConfig.from_dict({"stepz": 3})
    assert TrainConfig.from_dict(TrainConfig(steps=7).to_dict()).steps == 7


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = TinyAV()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == [
        "audio_encoder.1.weight", "classifier.weight", "video_encoder.1.weight"
    ]
    assert "pos_token" in {names[id(p)] for p in no_decay["params"]}
    assert "audio_encoder.2.weight" in {names[id(p)] for p in no_decay["params"]}  # LayerNorm


def test_batches_are_a_pure_function_of_seed_and_step_and_shard_by_rank():
    size = 10
    assert batch_indices(size, 4, seed=3, step=7) == batch_indices(size, 4, seed=3, step=7)
    assert batch_indices(size, 4, seed=3, step=0) != batch_indices(size, 4, seed=4, step=0)
    # five steps of 2 items make one pass over the 10 items: each item exactly once
    epoch = [i for step in range(5) for i in batch_indices(size, 2, seed=0, step=step)]
    assert sorted(epoch) == list(range(size))
    # two ranks split each global batch into disjoint halves of the single-process order
    for step in range(3):
        rank0 = batch_indices(size, 2, 0, step, rank=0, world_size=2)
        rank1 = batch_indices(size, 2, 0, step, rank=1, world_size=2)
        assert rank0 + rank1 == batch_indices(size, 4, 0, step)


# ------------------------------------------------------------------ training


def test_training_lowers_loss_and_writes_the_run_files(tmp_path):
    _, summary = run(tmp_path, steps=30, eval_every=10, checkpoint_every=10, log_every=5, keep_checkpoints=2)
    train_records = records(tmp_path, "train")
    assert [r["step"] for r in train_records] == [5, 10, 15, 20, 25, 30]
    assert train_records[-1]["loss"] < 0.6 * train_records[0]["loss"]
    assert {"loss/nce", "loss/cls", "lr", "grad_norm", "samples_per_s"} <= set(train_records[0])
    assert [r["step"] for r in records(tmp_path, "eval")] == [0, 10, 20, 30]
    assert summary.final["loss"] < 0.5 * summary.baseline["loss"]
    assert summary.final["audio->video R@1"] > summary.baseline["audio->video R@1"] + 0.3
    assert summary.steps == 30 and summary.skipped_steps == 0 and not summary.interrupted
    assert {p.name for p in tmp_path.iterdir()} >= {
        "metrics.jsonl", "summary.json", "curves.png", "latest", "step-000020", "step-000030"
    }
    assert not (tmp_path / "step-000010").exists()  # pruned: only the newest 2 are kept
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["steps"] == 30 and on_disk["final"]["loss"] == pytest.approx(summary.final["loss"])


def test_evaluate_reports_the_eval_plan_and_leaves_rng_and_mode_alone():
    from avdsl.runtime.metrics import accuracy, retrieval

    torch.manual_seed(0)
    model = TinyAV().train()
    data = ToyAVDataset(40, missing=[3])
    before = torch.get_rng_state()
    results = evaluate(model, data, batches=3, batch_size=8)  # items 0..23, one missing
    assert torch.equal(torch.get_rng_state(), before) and model.training

    model.eval()
    items = [data[i] for i in range(24) if i != 3]
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    with torch.no_grad():
        out = model(**batch)
    expected = retrieval(out["outputs"]["video_embedding"], out["outputs"]["audio_embedding"])
    assert results["video->audio R@5"] == pytest.approx(expected["R@5"])
    assert results["audio->video chance_r1"] == pytest.approx(1 / 23)
    assert results["logits accuracy"] == pytest.approx(accuracy(out["outputs"]["logits"], batch["label"]))
    # losses are per-item means over batches of 8, 7 and 8 items, so not the full-batch loss
    assert set(results) >= {"loss", "loss/nce", "loss/cls"}
    assert results["loss/cls"] == pytest.approx(float(out["losses"]["cls"]), rel=1e-5)


def test_resumed_run_ends_with_bitwise_the_same_weights(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    settings = dict(steps=10, checkpoint_every=5, eval_every=5, keep_checkpoints=5)
    reference, _ = run(whole, **settings)
    assert find_latest(whole).name == "step-000010"

    split.mkdir()  # the run that was killed after its step-5 checkpoint
    shutil.copytree(whole / "step-000005", split / "step-000005")
    torch.manual_seed(1234)
    resumed = TinyAV()  # different init; the checkpoint overrides it
    _, summary = run(split, model=resumed, resume=True, **settings)

    assert summary.start_step == 5 and summary.steps == 10
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    whole_log = [r for r in records(whole, "train") if r["step"] > 5]
    split_log = records(split, "train")
    assert [r["loss"] for r in whole_log] == [r["loss"] for r in split_log]


def test_fresh_run_refuses_a_used_run_dir_and_resume_refuses_another_spec(tmp_path):
    run(tmp_path, steps=2)
    with pytest.raises(FileExistsError, match="pass resume"):
        run(tmp_path, steps=2)
    torch.manual_seed(0)
    with pytest.raises(CheckpointMismatch, match="tinyhash"):
        train(TinyAV(), ToyAVDataset(64), ToyAVDataset(16), config(tmp_path, resume=True),
              SPEC, "otherhash", console=quiet())


class PoisonedAV(TinyAV):
    """TinyAV whose "cls" term turns NaN on the given training calls (1-based)."""

    def __init__(self, poisoned_calls):
        super().__init__()
        self.poisoned_calls = set(poisoned_calls)
        self.calls = 0

    def forward(self, audio, video, label=None):
        result = super().forward(audio, video, label)
        if self.training:
            self.calls += 1
            if self.calls in self.poisoned_calls:
                result["losses"]["cls"] = result["losses"]["cls"] * float("nan")
                result["loss"] = sum(result["losses"].values())
        return result


def test_nonfinite_stop_names_the_term_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = PoisonedAV(poisoned_calls=[4])
    with pytest.raises(NonFiniteLoss) as error:
        run(tmp_path, model=model, steps=10, checkpoint_every=2)
    message = str(error.value)
    assert "step 4" in message and "'cls'" in message and "'nce'" not in message
    assert "step-000002" in message
    assert error.value.step == 4 and error.value.terms == ["cls"]
    assert find_latest(tmp_path).name == "step-000002"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == ["step-000002"]


def test_nonfinite_skip_counts_skipped_steps_and_leaves_weights_finite(tmp_path):
    torch.manual_seed(0)
    model = PoisonedAV(poisoned_calls=[3, 7])
    _, summary = run(tmp_path, model=model, steps=10, on_nonfinite="skip")
    assert summary.skipped_steps == 2 and summary.steps == 10
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert records(tmp_path, "train")[-1]["skipped_steps"] == 2


def test_items_that_fail_to_load_are_counted(tmp_path):
    train_set = ToyAVDataset(32, missing=[0, 5, 9])
    _, summary = run(tmp_path, train_set=train_set, steps=4, batch_size=16)
    # 4 steps x 16 = two passes over 32 items: each missing item is drawn twice
    assert summary.skipped_files == 6


class SelfTerminating(TinyAV):
    """Sends SIGTERM to its own process during the given training call."""

    def __init__(self, at_call):
        super().__init__()
        self.at_call, self.calls = at_call, 0

    def forward(self, audio, video, label=None):
        if self.training:
            self.calls += 1
            if self.calls == self.at_call:
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(audio, video, label)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_returns(tmp_path):
    torch.manual_seed(0)
    _, summary = run(tmp_path, model=SelfTerminating(at_call=3), steps=50)
    assert summary.interrupted and summary.steps == 3
    assert find_latest(tmp_path).name == "step-000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    _, resumed = run(tmp_path, steps=5, resume=True)
    assert resumed.start_step == 3 and resumed.steps == 5


def test_bf16_autocast_trains(tmp_path):
    _, summary = run(tmp_path, steps=15, precision="bf16")
    assert math.isfinite(summary.final["loss"]) and summary.final["loss"] < summary.baseline["loss"]


@pytest.mark.slow
def test_workers_give_the_same_batches_as_the_main_process(tmp_path):
    inline, _ = run(tmp_path / "inline", steps=4)
    threaded, _ = run(tmp_path / "workers", steps=4, workers=2)
    for a, b in zip(inline.parameters(), threaded.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_torch_compile_option_trains(tmp_path):
    _, summary = run(tmp_path, steps=5, compile=True)
    assert summary.steps == 5 and math.isfinite(summary.final["loss"])


# ------------------------------------------------------------------ a real kill -9

KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from rich.console import Console
    from avdsl.runtime.train import TrainConfig, train
    from avdsl.runtime.train import checkpoint
    from avdsl.runtime.train.toy import TinyAV, ToyAVDataset

    delay = float(os.environ.get("AVDSL_TEST_FSYNC_DELAY", "0"))
    if delay:  # make every checkpoint write slow so that a kill lands mid-write
        original = checkpoint._fsync_file
        def slow_fsync(path):
            time.sleep(delay)
            original(path)
        checkpoint._fsync_file = slow_fsync

    run_dir, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    config = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=2, eval_every=0,
                         eval_batches=1, checkpoint_every=1, keep_checkpoints=2, log_every=1,
                         run_dir=run_dir, device="cpu", resume=True)
    train(TinyAV(), ToyAVDataset(64), ToyAVDataset(16, seed=1), config, "model: tiny\\n",
          "tinyhash", console=Console(file=open(os.devnull, "w")))
    """
)


def test_kill_9_mid_checkpoint_then_resume(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(KILL_SCRIPT)
    run_dir = tmp_path / "run"
    env = {**os.environ, "AVDSL_TEST_FSYNC_DELAY": "0.4", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, str(script), str(run_dir), "40"], env=env, cwd=REPO)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            done = run_dir.exists() and find_latest(run_dir) is not None
            writing = run_dir.exists() and any(p.name.startswith(".tmp-step-") for p in run_dir.iterdir())
            if done and writing:
                break
            assert process.poll() is None, "training script exited early"
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint appeared in time")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()

    partial = [p for p in run_dir.iterdir() if p.name.startswith(".tmp-step-")]
    assert partial, "the kill should have landed in the middle of a checkpoint write"
    latest = find_latest(run_dir)
    killed_at = int(latest.name.split("-")[1])
    assert killed_at >= 1
    assert load_checkpoint(latest, TinyAV(), spec_hash="tinyhash").step == killed_at

    torch.manual_seed(0)
    summary = train(TinyAV(), ToyAVDataset(64), ToyAVDataset(16, seed=1),
                    config(run_dir, steps=killed_at + 3, batch_size=8, lr=1e-3, checkpoint_every=1,
                           keep_checkpoints=2, eval_batches=1, resume=True),
                    SPEC, HASH, console=quiet())
    assert summary.start_step == killed_at and summary.steps == killed_at + 3
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp")]  # stale partial cleaned
    final = find_latest(run_dir)
    assert final.name == f"step-{killed_at + 3:06d}"
    assert load_checkpoint(final, TinyAV(), spec_hash=HASH).step == killed_at + 3
    steps_logged = [r["step"] for r in records(run_dir, "train")]
    assert steps_logged == list(range(1, killed_at + 4))  # one continuous log, no repeats


def test_weight_decay_by_role_in_a_compiled_model():
    """Patch and tubelet projections are weights (decayed); positions, type embeddings, latent and CLS
    tokens, norms, biases and embedding tables are not, whatever their names."""
    from avdsl.api import build_model

    _, model = build_model("tiny/vatt")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert {"video_tokenize.proj.weight", "audio_tokenize.proj.weight", "text_tokenize.proj.weight"} <= decayed
    assert {"audio_position.pos", "video_position.axes.0", "video_cls.tokens", "audio_cls.tokens"} <= kept
    assert all(p.ndim >= 2 for p in decay["params"])
    assert not any(n.endswith(".bias") for n in decayed)
    _, zorro = build_model("tiny/zorro")
    decay, no_decay = param_groups(zorro, 0.1)
    names = {id(p): n for n, p in zorro.named_parameters()}
    assert "fusion_latent.tokens" in {names[id(p)] for p in no_decay["params"]}
    assert "audio_tokenize.proj.weight" in {names[id(p)] for p in decay["params"]}
