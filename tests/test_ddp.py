"""Training in several CPU processes (gloo), started by torch's launcher: DDP replicas end equal, and
FSDP (fully_shard) trains like one process, with checkpoints that resume on another process count."""
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

from avdsl.runtime.train import TrainConfig, launch, train
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


@pytest.mark.slow  # starts two process groups (about 20-30 s on 2 cores)
def test_fsdp_two_processes_train_like_one_and_resume_on_one(tmp_path):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    fsdp_worker(str(one), 4, 16, False)  # one process: fsdp does not apply, the plain model trains
    summary = launch(2, fsdp_worker, str(two), 4, 8, False)  # the same global batch of 16, sharded
    assert summary["steps"] == 4 and summary["sharded"]

    curve_one, curve_two = _eval_losses(one), _eval_losses(two)
    assert [s for s, _ in curve_two] == [0, 1, 2, 3, 4]
    assert curve_one[-1][1] < curve_one[0][1] - 0.05  # it learned something
    for (s1, l1), (s2, l2) in zip(curve_one, curve_two):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-4), (s1, l1, l2)
    w_one = load_file(str(one / "step-000004" / "model.safetensors"))
    w_two = load_file(str(two / "step-000004" / "model.safetensors"))  # gathered: full shapes
    assert set(w_one) == set(w_two)
    for name in w_one:
        torch.testing.assert_close(w_two[name], w_one[name], atol=1e-5, rtol=1e-4)

    # the 2-process checkpoint of step 2 (optimizer state keyed by name) resumes in one process
    resumed.mkdir()
    shutil.copytree(two / "step-000002", resumed / "step-000002")
    state = torch.load(resumed / "step-000002" / "state.pt", weights_only=True)
    assert all(isinstance(k, str) for k in state["optimizer"]["state"])
    fsdp_worker(str(resumed), 4, 16, True)
    w_resumed = load_file(str(resumed / "step-000004" / "model.safetensors"))
    for name in w_one:
        torch.testing.assert_close(w_resumed[name], w_one[name], atol=1e-5, rtol=1e-4)


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert current() == DistInfo(rank=0, world_size=1, local_rank=0)
    assert current().is_main and not current().distributed


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="zero3")
