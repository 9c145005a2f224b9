"""Training in several CPU processes (gloo), started by torch's launcher: DDP replicas end equal, and
FSDP (fully_shard) trains like one process, with sharded checkpoints that resume on another process count."""
from __future__ import annotations

import io
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from avdsl.runtime.train import TrainConfig, launch, load_checkpoint, train
from avdsl.runtime.train.distributed import DistInfo, current, is_sharded
from avdsl.runtime.train.toy import TinyAV, ToyAVDataset


def ddp_worker(run_dir: str, out_dir: str) -> None:
    """One rank: build a model with a rank-specific init, train 2 steps, save what it holds."""
    torch.set_num_threads(1)
    info = current()
    torch.manual_seed(100 + info.rank)  # differing inits: DDP must broadcast rank 0's weights
    model = TinyAV(dropout=0.0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(
        steps=2, batch_size=8, lr=1e-2, warmup_steps=0, eval_every=0, eval_batches=1,
        checkpoint_every=0, log_every=1, run_dir=run_dir, device="cpu",
    )
    summary = train(model, ToyAVDataset(64), ToyAVDataset(16, seed=1), config, "model: tiny\n",
                    "tinyhash", console=Console(file=io.StringIO()))
    torch.save(
        {"rank": info.rank, "world": info.world_size, "initial": initial,
         "final": model.state_dict(), "steps": summary.steps},
        Path(out_dir) / f"rank{info.rank}.pt",
    )


def test_two_processes_end_with_equal_trained_weights(tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    handler = signal.getsignal(signal.SIGTERM)
    launch(2, ddp_worker, str(run_dir), str(out_dir))
    assert signal.getsignal(signal.SIGTERM) is handler  # the launcher's handlers do not outlive it

    rank0 = torch.load(out_dir / "rank0.pt", weights_only=True)
    rank1 = torch.load(out_dir / "rank1.pt", weights_only=True)
    assert (rank0["rank"], rank1["rank"], rank0["world"], rank0["steps"]) == (0, 1, 2, 2)
    assert not torch.equal(rank0["initial"]["classifier.weight"], rank1["initial"]["classifier.weight"])
    for name, value in rank0["final"].items():
        assert torch.equal(value, rank1["final"][name]), name
    changed = [n for n, v in rank0["final"].items() if not torch.equal(v, rank0["initial"][n])]
    assert "audio_encoder.1.weight" in changed and "classifier.weight" in changed

    # only rank 0 wrote: one final checkpoint, and one log line per step (not two)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step-")) == ["step-000002"]
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2]


class PerItemAV(TinyAV):
    """TinyAV trained on its classifier loss only: a mean over items, so a global batch split over
    two processes gives the same gradient as one process reading all of it (unlike InfoNCE)."""

    def forward(self, audio, video, label=None):
        result = super().forward(audio, video, label)
        result["losses"].pop("nce")
        result["loss"] = sum(result["losses"].values())
        return result


def fsdp_worker(run_dir: str, steps: int, batch_size: int, resume: bool) -> dict:
    """Train PerItemAV from the same init (every rank) with fsdp; checkpoints every 2 steps."""
    torch.set_num_threads(1)
    torch.manual_seed(7)
    model = PerItemAV(dropout=0.0)
    config = TrainConfig(
        steps=steps, batch_size=batch_size, lr=1e-2, warmup_steps=0, eval_every=1, eval_batches=2,
        checkpoint_every=2, log_every=1, run_dir=run_dir, device="cpu", strategy="fsdp", resume=resume,
    )
    summary = train(model, ToyAVDataset(64), ToyAVDataset(16, seed=1), config, "model: tiny\n", "tinyhash",
                    console=Console(file=io.StringIO()))
    return {**summary.to_dict(), "sharded": is_sharded(model)}


def _eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if r["kind"] == "eval"]


def _weights(checkpoint: Path) -> dict:
    """The weights of a checkpoint of either form, as one process reads them (no process group)."""
    model = PerItemAV(dropout=0.0)
    load_checkpoint(checkpoint, model, spec_hash="tinyhash")
    return model.state_dict()


@pytest.mark.slow  # starts three process groups (about a minute on 2 cores)
def test_fsdp_two_processes_train_like_one_save_shards_and_resume_on_one_or_two(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    fsdp_worker(str(one), 4, 16, False)  # one process: fsdp does not apply, the plain model trains
    summary = launch(2, fsdp_worker, str(two), 4, 8, False)  # the same global batch of 16, sharded
    assert summary["steps"] == 4 and summary["sharded"]

    curve_one, curve_two = _eval_losses(one), _eval_losses(two)
    assert [s for s, _ in curve_two] == [0, 1, 2, 3, 4]
    assert curve_one[-1][1] < curve_one[0][1] - 0.05  # it learned something
    for (s1, l1), (s2, l2) in zip(curve_one, curve_two):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-4), (s1, l1, l2)

    # each process wrote its own shards of the weights and optimizer state; nothing was gathered
    final = two / "step-000004"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["form"] == "sharded" and meta["processes"] == 2
    assert not (final / "model.safetensors").exists()
    assert sorted(p.name for p in (final / "sharded" / "model").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert len(list((final / "sharded" / "optimizer").iterdir())) == 2
    rank1 = load_file(str(final / "sharded" / "model" / "shard-00002-model-00001-of-00001.safetensors"))
    assert rank1["classifier.weight"].shape == (2, 16)  # half of the [4, 16] weight
    assert sorted(p.name for p in two.iterdir() if p.name.startswith((".tmp", "step-"))) == [
        "step-000002", "step-000004"]
    w_one = load_file(str(one / "step-000004" / "model.safetensors"))
    w_two = _weights(final)
    assert set(w_one) == set(w_two)
    for name in w_one:
        torch.testing.assert_close(w_two[name], w_one[name], atol=1e-5, rtol=1e-4)

    # the 2-process checkpoint of step 2 resumes in one process (plain model, no process group) and
    # in two, continuing the same curve to the same weights
    for processes in (1, 2):
        resumed = tmp_path / f"resumed{processes}"
        resumed.mkdir()
        shutil.copytree(two / "step-000002", resumed / "step-000002")
        launch(processes, fsdp_worker, str(resumed), 4, 16 // processes, True)
        curve = _eval_losses(resumed)
        assert [s for s, _ in curve] == [3, 4]
        assert [l for _, l in curve] == pytest.approx([l for _, l in curve_one[3:]], abs=1e-4)
        w_resumed = _weights(resumed / "step-000004")
        for name in w_one:
            torch.testing.assert_close(w_resumed[name], w_one[name], atol=1e-5, rtol=1e-4)
    # parameters without a gradient (used by the dropped loss only) got no optimizer state, as in one run
    stored = torch.load(tmp_path / "resumed1" / "step-000004" / "state.pt", weights_only=True)["optimizer"]
    expected = torch.load(one / "step-000004" / "state.pt", weights_only=True)["optimizer"]
    assert stored["state"].keys() == expected["state"].keys() and len(expected["state"]) < len(w_one)


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert current() == DistInfo(rank=0, world_size=1, local_rank=0)
    assert current().is_main and not current().distributed


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="zero3")


def _train_cli(run_dir: Path, *extra: str) -> list[tuple[int, float]]:
    import subprocess
    import sys

    command = [sys.executable, "-m", "avdsl", "train", "tiny/zorro", "--nproc", "2", "--strategy", "fsdp",
               "--steps", "2", "--batch-size", "4", "--train-size", "16", "--val-size", "8", "--eval-every", "0",
               "--run-dir", str(run_dir), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    return _eval_losses(run_dir)


@pytest.mark.slow  # two 2-process runs of a spec, one compiling its layers (a few minutes on 2 cores)
def test_fsdp_with_compiled_layers_trains_like_eager_fsdp(tmp_path):
    eager = _train_cli(tmp_path / "eager")
    compiled = _train_cli(tmp_path / "compiled", "--compile")
    assert [s for s, _ in compiled] == [0, 2]
    assert compiled[-1][1] < compiled[0][1]
    assert [l for _, l in compiled] == pytest.approx([l for _, l in eager], abs=1e-4)
