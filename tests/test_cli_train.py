"""`avdsl train`, `eval`, `export` and `--resume` from the command line, on embedded and real media data."""
from __future__ import annotations

import json

import pytest
import torch

SMALL = ["--train-size", "32", "--val-size", "16", "--batch-size", "8", "--eval-every", "0", "--seed", "3"]


def test_train_eval_export_and_resume(run_cli, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli("train", "tiny/zorro", "--steps", "4", "--checkpoint-every", "2", "--run-dir", str(run), *SMALL)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4
    assert "za->zv R@1" in summary["baseline"] and "za->zv R@1" in summary["final"]
    assert (run / "curves.png").stat().st_size > 10_000
    assert (run / "step-000004" / "model.safetensors").is_file()
    assert (run / "latest").read_text().strip() == "step-000004"

    code, out, err = run_cli("eval", str(run), "--batches", "2", "--batch-size", "8", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["checkpoint"].endswith("step-000004")
    assert 0.0 <= metrics["za->zv R@1"] <= 1.0

    code, out, err = run_cli("export", str(run), "--format", "torch-export")
    assert code == 0, err
    assert (run / "step-000004" / "model.pt2").stat().st_size > 0

    # a resumed run continues from the newest checkpoint, with the step count it had
    code, out, err = run_cli("train", "tiny/zorro", "--steps", "6", "--run-dir", str(run), "--resume", *SMALL)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["start_step"], summary["steps"]) == (4, 6)
    assert (run / "latest").read_text().strip() == "step-000006"
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and steps[-1] == 6  # one continuous log across the resume

    # a fresh run into a used run directory is refused, with a hint
    code, out, err = run_cli("train", "tiny/zorro", "--steps", "2", "--run-dir", str(run), *SMALL)
    assert code == 2 and "--resume" in err


def test_checkpoint_of_another_spec_is_refused(run_cli, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli("train", "tiny/zorro", "--steps", "2", "--run-dir", str(run), *SMALL)
    assert code == 0, err
    code, out, err = run_cli("train", "tiny/zorro", "--set", "encoders.backbone.depth=1", "--steps", "4",
                             "--run-dir", str(run), "--resume", *SMALL)
    assert code == 2
    assert "spec" in err and "hash" in err


def test_train_on_real_media_files_skips_and_counts_a_corrupt_one(run_cli, tmp_path):
    from avdsl.runtime.data.media import make_manifest

    folder = tmp_path / "clips"
    manifest = make_manifest(folder, 6, seconds=1.3, size=32)
    val = make_manifest(tmp_path / "val", 2, seed=100, seconds=1.3, size=32, split="val")
    rows = manifest.read_text().splitlines()
    for row in val.read_text().splitlines():
        entry = json.loads(row)
        entry["path"] = str(tmp_path / "val" / entry["path"])
        rows.append(json.dumps(entry))
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    rows.append(json.dumps({"path": "broken.mp4", "label": 1, "caption": "x", "split": "train"}))
    manifest.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    code, out, err = run_cli("train", "tiny/zorro", "--data", str(manifest), "--steps", "3", "--batch-size", "4",
                             "--eval-every", "0", "--run-dir", str(run))
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["skipped_files"] >= 1


def test_missing_manifest_is_a_clear_error(run_cli, tmp_path):
    code, out, err = run_cli("train", "tiny/zorro", "--data", str(tmp_path / "nope.jsonl"), "--steps", "1")
    assert code == 2
    assert "no manifest file" in err and "hint:" in err


def test_eval_and_export_read_a_sharded_checkpoint(run_cli, tmp_path):
    """The form an fsdp run of several processes writes (no model.safetensors) is read by one process
    without a process group (as `train --init` reads it too); `export --format safetensors` turns it
    into one weights file."""
    from safetensors.torch import load_file

    from avdsl.api import analyse_doc
    from avdsl.compiler import compile_graph
    from avdsl.loader import load_file as load_spec
    from avdsl.runtime.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = compile_graph(analyse_doc(load_spec("tiny/zorro", [])).graph)
    shards = tmp_path / "shards"
    save_checkpoint(shards, 1, model, None, None, {}, model.spec_text, model.spec_hash, form="sharded")
    assert not (shards / "step-000001" / "model.safetensors").exists()

    code, out, err = run_cli("eval", str(shards), "--batches", "1", "--batch-size", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["checkpoint"].endswith("step-000001")
    code, out, err = run_cli("export", str(shards), "--format", "safetensors", "-o", str(tmp_path / "one.safetensors"))
    assert code == 0, err
    written, expected = load_file(str(tmp_path / "one.safetensors")), model.state_dict()
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
