"""Data-parallel training: two CPU processes (gloo) end with identical, trained weights."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
from rich.console import Console

from avdsl.runtime.train import TrainConfig, launch, train
from avdsl.runtime.train.distributed import DistInfo, current, free_port
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
    launch(2, ddp_worker, str(run_dir), str(out_dir))

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


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert current() == DistInfo(rank=0, world_size=1, local_rank=0)
    assert current().is_main and not current().distributed
    assert 0 < free_port() < 65536
