"""Checkpoints: exact round trips, refusals with clear messages, atomic writes, disk-full safety."""
from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from avdsl.runtime.train import checkpoint as ckpt
from avdsl.runtime.train.checkpoint import (
    CheckpointMismatch,
    CheckpointWriteError,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from avdsl.runtime.train.loop import param_groups
from avdsl.runtime.train.schedule import make_scheduler
from avdsl.runtime.train.toy import TinyAV, ToyAVDataset
from torch.utils.data import default_collate

SPEC = "model: tiny\n"


def trained_state(seed: int = 0, steps: int = 3):
    """A TinyAV with its AdamW and scheduler after a few real steps (so optimizer state exists)."""
    torch.manual_seed(seed)
    model = TinyAV()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    scheduler = make_scheduler(optimizer, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    data = ToyAVDataset(32)
    for step in range(steps):
        batch = default_collate([data[i] for i in range(step * 8, step * 8 + 8)])
        model(**batch)["loss"].backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def fresh_state(seed: int = 99):
    torch.manual_seed(seed)
    model = TinyAV()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    scheduler = make_scheduler(optimizer, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    return model, optimizer, scheduler


def save(run_dir, step, model, optimizer=None, scheduler=None, spec_hash="hash-a", **kwargs):
    return save_checkpoint(
        run_dir, step, model, optimizer, scheduler, {"steps": 10}, SPEC, spec_hash, **kwargs
    )


def test_round_trip_restores_weights_optimizer_scheduler_rng_and_step(tmp_path):
    model, optimizer, scheduler = trained_state()
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = save(tmp_path, 3, model, optimizer, scheduler, metrics={"loss": 1.5}, counters={"skipped_files": 2})
    expected_draws = (torch.rand(4), np.random.rand(3), random.random())

    model2, optimizer2, scheduler2 = fresh_state()
    torch.manual_seed(1234)  # scramble the RNGs
    np.random.seed(1234)
    random.seed(1234)
    loaded = load_checkpoint(path, model2, optimizer2, scheduler2, spec_hash="hash-a")
    restore_rng_state(loaded.rng)

    assert path.name == "step-000003"
    assert loaded.step == 3 and loaded.counters == {"skipped_files": 2}
    assert loaded.meta["metrics"] == {"loss": 1.5} and loaded.meta["spec_hash"] == "hash-a"
    assert (path / "spec.yaml").read_text() == SPEC
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    state_a, state_b = optimizer.state_dict(), optimizer2.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    for index, per_param in state_a["state"].items():
        for key, value in per_param.items():
            assert torch.equal(value, state_b["state"][index][key]), (index, key)
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    draws = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(draws[0], expected_draws[0])
    assert np.array_equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2]


def test_state_file_loads_with_weights_only(tmp_path):
    model, optimizer, scheduler = trained_state()
    path = save(tmp_path, 1, model, optimizer, scheduler)
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["step"] == 1 and set(state["rng"]) >= {"torch", "numpy", "python"}


class Tied(nn.Module):
    """An embedding table shared with the output projection (one tensor, two names)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight


def test_shared_tensors_are_saved_once_and_stay_tied(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    path = save(tmp_path, 1, model)
    torch.manual_seed(1)
    other = Tied()
    load_checkpoint(path, other)
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert other.out.weight is other.embed.weight


def test_spec_hash_mismatch_is_refused_with_both_hashes_and_advice(tmp_path):
    model, _, _ = trained_state(steps=0)
    path = save(tmp_path, 2, model, spec_hash="aaaa1111")
    with pytest.raises(CheckpointMismatch) as error:
        load_checkpoint(path, TinyAV(), spec_hash="bbbb2222")
    message = str(error.value)
    assert "aaaa1111" in message and "bbbb2222" in message
    assert "spec.yaml" in message and "fresh run directory" in message


def test_shape_mismatch_lists_the_parameters(tmp_path):
    path = save(tmp_path, 1, TinyAV(dim=16))
    with pytest.raises(CheckpointMismatch) as error:
        load_checkpoint(path, TinyAV(dim=8))
    message = str(error.value)
    assert "classifier.weight: checkpoint [4, 16] vs model [4, 8]" in message
    assert "audio_encoder.1.weight" in message


def test_missing_parameters_are_refused(tmp_path):
    path = save(tmp_path, 1, TinyAV())
    model = TinyAV()
    model.extra = nn.Linear(2, 2)
    with pytest.raises(CheckpointMismatch, match="extra.weight"):
        load_checkpoint(path, model)


def test_find_latest_ignores_temp_and_partial_directories(tmp_path):
    model = TinyAV()
    save(tmp_path, 1, model)
    save(tmp_path, 2, model)
    (tmp_path / ".tmp-step-000009-123").mkdir()  # a writer died mid-write
    (tmp_path / ".tmp-step-000009-123" / "model.safetensors").write_bytes(b"half")
    partial = tmp_path / "step-000007"  # copied by hand, incomplete
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"")
    assert find_latest(tmp_path).name == "step-000002"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert (tmp_path / "latest").read_text().strip() == "step-000002"
    assert find_latest(tmp_path / "nowhere") is None


def test_keep_prunes_old_checkpoints_and_stale_temp_dirs(tmp_path):
    model = TinyAV()
    (tmp_path / ".tmp-step-000002-999").mkdir()
    for step in range(1, 6):
        save(tmp_path, step, model, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step-000004", "step-000005"]


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 3, TinyAV(), metrics={"loss": 2.0})
    path = save(tmp_path, 3, TinyAV(), metrics={"loss": 1.0})
    assert json.loads((path / "meta.json").read_text())["metrics"] == {"loss": 1.0}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_disk_full_keeps_previous_checkpoint_and_removes_partial(tmp_path, monkeypatch):
    model, optimizer, scheduler = trained_state()
    first = save(tmp_path, 1, model, optimizer, scheduler)

    def disk_full(path, text):  # the weights and state are written, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_text", disk_full)
    with pytest.raises(CheckpointWriteError) as error:
        save(tmp_path, 2, model, optimizer, scheduler)
    message = str(error.value)
    assert "out of disk space" in message and "step-000002" in message
    assert f"previous checkpoint {first} is intact" in message
    assert isinstance(error.value.__cause__, OSError)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]
    assert (tmp_path / "latest").read_text().strip() == "step-000001"
    assert find_latest(tmp_path) == first
    model2, optimizer2, scheduler2 = fresh_state()
    assert load_checkpoint(first, model2, optimizer2, scheduler2).step == 1
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_sharded_form_round_trips_in_one_process_without_a_process_group(tmp_path):
    """The form an fsdp run of several processes writes (torch.distributed.checkpoint shards in
    safetensors files, no model.safetensors) reads back into a plain model and optimizer."""
    model, optimizer, scheduler = trained_state()
    torch.manual_seed(7)
    path = save(tmp_path, 3, model, optimizer, scheduler, form="sharded")
    expected_draw = torch.rand(3)

    assert not (path / "model.safetensors").exists()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["form"] == "sharded" and meta["shards"] == [
        "model/shard-00001-model-00001-of-00001.safetensors",
        "optimizer/shard-00001-model-00001-of-00001.safetensors",
    ]
    assert find_latest(tmp_path) == path and (tmp_path / "latest").read_text().strip() == path.name
    model2, optimizer2, scheduler2 = fresh_state()
    loaded = load_checkpoint(path, model2, optimizer2, scheduler2, spec_hash="hash-a")
    restore_rng_state(loaded.rng)
    assert loaded.step == 3 and torch.equal(torch.rand(3), expected_draw)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    state_a, state_b = optimizer.state_dict(), optimizer2.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    assert state_a["state"].keys() == state_b["state"].keys()
    for index, per_param in state_a["state"].items():
        for key, value in per_param.items():
            assert torch.equal(value, state_b["state"][index][key]), (index, key)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()

    with pytest.raises(CheckpointMismatch, match=r"classifier.weight: checkpoint \[4, 16\] vs model \[4, 8\]"):
        load_checkpoint(path, TinyAV(dim=8))
    (path / "sharded" / meta["shards"][0]).unlink()  # a lost shard: no longer a complete checkpoint
    assert find_latest(tmp_path) is None
