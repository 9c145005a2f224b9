"""Hostile input: no code runs, nothing grows without bound, every bad input is one clear error.

Inputs an attacker or a careless user could give, by kind:

* specs and ``--set`` values: ``tests/hostile_specs/`` (same header format as ``tests/bad_specs/``,
  see `test_bad_specs.load_case`), plus generated cases that cannot live in the repository (devices,
  FIFOs, sparse multi-GB files, symlink loops, names holding newlines);
* command lines: every numeric or path option out of range, refused before any work;
* ``diff FILE@REV``: revisions that look like git options, huge and non-UTF-8 blobs, ``extends`` at a revision;
* manifests: malformed rows, missing splits, labels out of range, FIFOs;
* checkpoints: tampered or truncated files, a spec.yaml that is huge or a FIFO, a folder name that is code;
* faults: a disk that fills during a checkpoint write, weights that turn NaN, SIGTERM before the loop.

Each must exit 2 (1 for a run that failed) with one `error:` line (FILE:LINE:COL where there is one),
no traceback, within LIMIT_S. A representative sample runs as real processes under ``prlimit --as``
(`test_under_memory_cap`), which also measures time and peak memory.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avdsl import cli
from avdsl.limits import MAX_SPEC_BYTES
from test_bad_specs import HEADLINE, check_one_diagnostic, load_case

HERE = Path(__file__).parent
CORPUS = HERE / "hostile_specs"
CASES = [load_case(p) for p in sorted(CORPUS.glob("*.yaml"))]
BASE = (CORPUS / "tau_zero.yaml").read_text().split("\n", 1)[1].replace("tau=0", "tau=0.07")  # the corpus' valid spec
LIMIT_S = 10.0
GiB = 1024**3


def one_error(code: int, out: str, err: str, exit_code: int = 2) -> str:
    """Exit code as expected, exactly one `error:` line, no traceback; returns that line."""
    assert code == exit_code, (code, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err, err[-3000:]
    errors = [line for line in err.splitlines() if line.lower().startswith("error")]  # ours, or click's `Error:`
    assert len(errors) == 1, err[-3000:]
    return errors[0]


@pytest.fixture
def run(capsys):
    """Run the command line in-process; returns (exit code, stdout, stderr, seconds)."""

    def go(*argv: str):
        t0 = time.perf_counter()
        code = cli.main([str(a) for a in argv])
        seconds = time.perf_counter() - t0
        captured = capsys.readouterr()
        assert seconds < LIMIT_S, (argv[:3], seconds)
        return code, captured.out, captured.err

    return go


@pytest.fixture(scope="module", autouse=True)
def warm():
    """Import every command and the grammar once, so that timings measure the checks."""
    cli.main(["build", "tiny/zorro", "--json"])


@pytest.fixture
def base_spec(tmp_path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    return path


# ------------------------------------------------------------------------------- spec corpus


def test_corpus_is_large_and_covers_every_kind():
    assert len(CASES) >= 120
    names = " ".join(c.name for c in CASES)
    for kind in ("set_", "nan", "inf", "digits", "huge", "zero", "negative", "_on_", "name", "rule_set", "routing",
                 "extends", "train_", "key"):
        assert kind in names, kind


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_spec(case, run, monkeypatch):
    monkeypatch.chdir(CORPUS)
    code, out, err = run("build", case.name, *case.args)
    m = check_one_diagnostic(code, out, err)
    assert (m["file"], int(m["line"]), int(m["col"])) == (case.file, case.line, case.col), err
    assert case.message in m["message"], err
    if case.hint:
        assert case.hint in err.split("\nhint: ", 1)[1], err


def test_base_of_the_corpus_is_valid(base_spec, run):
    code, out, err = run("build", base_spec)
    assert code == 0, err


def test_brackets_in_comments_do_not_count_as_nesting(base_spec, run):
    base_spec.write_text("# " + "[" * 70 + "\n" + BASE + "# " + "{" * 70 + "\n")
    code, out, err = run("build", base_spec)
    assert code == 0, err


def test_a_deep_chain_of_rule_sets_without_a_loop_is_valid(base_spec, run):
    sets = "".join(f"  s{i}: [use s{i + 1}]\n" for i in range(9)) + "  s9: [audio <- audio]\n"
    base_spec.write_text(BASE.replace("encoders:\n", "rule_sets:\n" + sets + "encoders:\n").replace("- audio <- audio", "- use s0"))
    code, out, err = run("build", base_spec)
    assert code == 0, err


# ------------------------------------------------------------------------- generated spec files


def _sparse(path: Path, size: int, head: bytes = b"avdsl: 1\n") -> Path:
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "/dev/null", "/proc/self/environ"])
def test_devices_and_virtual_files_are_refused(target, run):
    if not os.path.exists(target):
        pytest.skip(f"{target} does not exist here")
    one_error(*run("build", target))


def test_fifo_spec_does_not_hang(tmp_path, run):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    line = one_error(*run("build", fifo))
    assert "not a regular file" in line


def test_huge_sparse_file_is_refused_without_reading_it(tmp_path, run):
    line = one_error(*run("build", _sparse(tmp_path / "big.yaml", 8 * GiB)))
    assert "larger than" in line


@pytest.mark.parametrize("kind", ["fifo", "huge", "device", "symlink_loop", "directory", "nul"])
def test_bad_extends_targets(kind, base_spec, tmp_path, run):
    target = tmp_path / "parent.yaml"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "huge":
        _sparse(target, 8 * GiB)
    elif kind == "device":
        target.symlink_to("/dev/zero")
    elif kind == "symlink_loop":
        target.symlink_to(tmp_path / "loop.yaml")
        (tmp_path / "loop.yaml").symlink_to(target)
    elif kind == "directory":
        target.mkdir()
    name = "./parent.yaml" if kind != "nul" else '"./par\\0ent.yaml"'
    base_spec.write_text(BASE.replace("avdsl: 1\n", f"avdsl: 1\nextends: {name}\n"))
    code, out, err = run("build", base_spec)
    line = one_error(code, out, err)
    assert "base.yaml:2:" in line or "parent.yaml" in line, line


def test_a_huge_file_is_never_read_to_quote_its_line(tmp_path):
    """`source_line` reads no more than a spec's size limit, whatever line is asked for."""
    from avdsl.diagnostics import Loc, source_line

    big = _sparse(tmp_path / "big.yaml", 8 * GiB, b"first line\n")
    t0 = time.perf_counter()
    assert source_line(Loc(str(big), 1, 1)) == "first line"
    assert source_line(Loc(str(big), 3_000_000, 1)) is None
    assert time.perf_counter() - t0 < 1.0
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert source_line(Loc(str(fifo), 1, 1)) is None


# ------------------------------------------------------------------------------ code execution


INJECTION = "z\nimport os;os.system('touch pwned')\n#"  # run from tmp_path, it would create tmp_path/pwned


def test_spec_path_with_newline_never_becomes_code(tmp_path, run, monkeypatch):
    import ast

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    spec = tmp_path / f"{INJECTION}.yaml"
    try:
        spec.write_text(BASE)
    except OSError:
        pytest.skip("the file system refuses newlines in names")
    code, out, err = run("build", spec, "--emit", "code")
    assert code == 0, err
    tree = ast.parse(out)
    assert [type(n).__name__ for n in tree.body] == ["FunctionDef"], out[:500]
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))

    from avdsl.api import analyse
    from avdsl.compiler import compile_graph

    compile_graph(analyse(str(spec)).graph)  # exec()s the generated forward
    assert not marker.exists()


def test_generated_comments_replace_every_control_character():
    from avdsl.codegen import comment_text as comment

    for text in ("a\nb", "a\rb", "a\x0cb", "a\u2028b", "a\x1b[31mb", "a\x00b"):
        assert "\n" not in comment(text) and "\r" not in comment(text) and comment(text).isprintable()
    assert comment("specs/zorro.yaml") == "specs/zorro.yaml"


def test_markup_in_a_path_is_printed_not_interpreted(run):
    line = one_error(*run("build", "x[/]"))
    assert "x[/]" in line


# --------------------------------------------------------------------------------- diff FILE@REV


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path / "repo"
    (root / "specs").mkdir(parents=True)
    (root / "specs" / "parent.yaml").write_text(BASE)
    (root / "specs" / "child.yaml").write_text("avdsl: 1\nextends: ./parent.yaml\nname: child\n")
    (root / "specs" / "binary.yaml").write_bytes(b"avdsl: 1\nname: \xff\xfe\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-qm", "one")
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize("rev", ["--output=written.txt", "-p", "--help", "HEAD:..", "a b", "HEAD..main", "x;rm", ""])
def test_revisions_never_become_git_options(repo, run, rev):
    one_error(*run("diff", f"specs/child.yaml@{rev}", "specs/child.yaml"))
    assert not (repo / "written.txt").exists()


def test_extends_at_a_revision_reads_the_base_at_that_revision(repo, run):
    (repo / "specs" / "parent.yaml").write_text(BASE.replace("depth: 2", "depth: 3"))
    code, out, err = run("diff", "specs/child.yaml@HEAD", "specs/child.yaml", "--json")
    assert code == 0, err
    changed = json.loads(out)["encoders"]["changed"]
    assert changed["backbone"]["depth"] == [2, 3]  # the committed base had depth 2


def test_huge_and_binary_blobs_at_a_revision(repo, run):
    _sparse(repo / "specs" / "huge.yaml", MAX_SPEC_BYTES + 10)
    _git(repo, "add", "specs/huge.yaml")
    _git(repo, "commit", "-qm", "huge")
    assert "larger than" in one_error(*run("diff", "specs/huge.yaml@HEAD", "specs/child.yaml"))
    assert "not UTF-8" in one_error(*run("diff", "specs/binary.yaml@HEAD", "specs/child.yaml"))
    one_error(*run("diff", "specs/missing.yaml@HEAD", "specs/child.yaml"))


# ---------------------------------------------------------------------------------- command lines

SMALL = ["--train-size", "8", "--val-size", "8", "--batch-size", "4", "--steps", "1"]
BAD_OPTIONS = [
    ["--seed", str(2**70)], ["--seed", "-1"], ["--lr", "-1"], ["--lr", "0"], ["--lr", "nan"], ["--lr", "inf"],
    ["--lr", "1e9"], ["--device", "cuda:7"], ["--device", "tpu"], ["--device", "not a device"],
    ["--batch-size", "-3"], ["--batch-size", "0"], ["--batch-size", str(10**8)], ["--train-size", "0"],
    ["--val-size", "0"], ["--train-size", str(10**9)], ["--nproc", "-2"], ["--nproc", "0"], ["--steps", "0"],
    ["--steps", "-5"], ["--workers", "-1"], ["--workers", "100000"], ["--eval-every", "-1"],
    ["--checkpoint-every", "-2"], ["--precision", "fp8"], ["--seed", "ten"], ["--data", "no-such.jsonl"],
]


@pytest.mark.parametrize("option", BAD_OPTIONS, ids=[" ".join(o) for o in BAD_OPTIONS])
def test_bad_train_options_are_refused_before_any_work(option, base_spec, tmp_path, run):
    run_dir = tmp_path / "run"
    args = [a for a in SMALL if a not in option]
    if option[0] in SMALL:
        i = SMALL.index(option[0])
        args = SMALL[:i] + SMALL[i + 2:]
    one_error(*run("train", base_spec, *args, *option, "--run-dir", run_dir))
    assert not (run_dir / "step-000001").exists()


@pytest.mark.parametrize("where", ["file", "proc", "under_file", "dev"])
def test_bad_run_dirs(where, base_spec, tmp_path, run):
    target = {"file": base_spec, "proc": Path("/proc/avdsl-run"), "under_file": base_spec / "run",
              "dev": Path("/dev/null")}[where]
    one_error(*run("train", base_spec, *SMALL, "--run-dir", target))


BAD_COMMANDS = [
    ["build", "tiny/zorro", "--batch", "0"], ["build", "tiny/zorro", "--batch", "-3"],
    ["build", "tiny/zorro", "--batch", str(10**8)], ["build", "tiny/zorro", "--set", "x"],
    ["build", "tiny/zorro", "--set", "encoders.backbone.depth=" + "9" * 5000],
    ["build", "tiny/zorro", "--set", "name=" + "[" * 5000], ["build", "tiny/zorro", "--set", "routing.\u00b2=1"],
    ["build", "tiny/zorro", "--set", "encoders.backbone.streams.\u00b2=x"],
    ["build", "tiny/zorro", "--set", "name=a\nb: 1"], ["build", "tiny/zorro", "--set", "na\nme=x"],
    ["build", "tiny/zorro", "--set", "name=\x1b[31mred"], ["build", "tiny/zorro", "--set", "extends=mbt"],
    ["build", "tiny/zorro", "--set", "vars=" + "{a: " * 100 + "1" + "}" * 100],
    ["build", "\x00"], ["build", "x" * 100_000], ["build", "tiny/zorro", "--precision", "fp8", "--compile"],
    ["eval", "no-such-run"], ["eval", "/dev/null"], ["eval", "tiny/zorro", "--batches", "0"],
    ["eval", "tiny/zorro", "--batch-size", "0"], ["export", "no-such-run", "--batch", "0"],
    ["graph", "tiny/zorro", "-o", "missing-folder/x.png"], ["masks", "tiny/zorro", "-o", "missing-folder/x.png"],
    ["graph", "tiny/zorro", "-o", "."], ["graph", "tiny/zorro", "-o", "x.exe"],
    ["diff", "tiny/zorro", "tiny/zorro", "--set-a", "encoders.backbone.heads=0"],
    ["lint", "/dev/zero"],
]


@pytest.mark.parametrize("argv", BAD_COMMANDS, ids=[" ".join(a)[:60] for a in BAD_COMMANDS])
def test_bad_command_lines(argv, run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(*argv)
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in out + err


# ---------------------------------------------------------------------------------- manifests


def _manifest(tmp_path: Path, name: str, lines: list[str] | None = None, raw: bytes | None = None) -> Path:
    path = tmp_path / name
    path.write_bytes(raw if raw is not None else ("\n".join(lines) + "\n").encode())
    return path


GOOD_ROW = '{"path": "a.mp4", "label": 1, "split": "val"}'
BAD_MANIFESTS = {
    "bad_json_line": ("m.jsonl", [GOOD_ROW, '{"path": "b.mp4",']),
    "row_is_a_list": ("m.jsonl", [GOOD_ROW, "[1, 2]"]),
    "row_is_a_number": ("m.jsonl", [GOOD_ROW, "7"]),
    "row_without_path": ("m.jsonl", [GOOD_ROW, '{"label": 1}']),
    "path_not_a_string": ("m.jsonl", [GOOD_ROW, '{"path": 12, "label": 1}']),
    "unknown_extension": ("m.txt", [GOOD_ROW]),
    "no_validation_rows": ("m.jsonl", ['{"path": "a.mp4", "label": 1, "split": "train"}']),
    "no_rows": ("m.jsonl", [""]),
    "label_out_of_range": ("m.jsonl", ['{"path": "a.mp4", "label": 99, "split": "val"}']),
    "label_negative": ("m.jsonl", ['{"path": "a.mp4", "label": -1, "split": "val"}']),
    "label_not_a_number": ("m.jsonl", ['{"path": "a.mp4", "label": "cat", "split": "val"}']),
    "label_huge": ("m.jsonl", ['{"path": "a.mp4", "label": ' + "9" * 400 + ', "split": "val"}']),
    "label_missing": ("m.jsonl", ['{"path": "a.mp4", "split": "val"}']),
    "csv_without_path": ("m.csv", ["file,label,split", "a.mp4,1,val"]),
    "csv_label_out_of_range": ("m.csv", ["path,label,split", "a.mp4,12,val"]),
    "csv_empty": ("m.csv", [""]),
}


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_bad_manifests(name, base_spec, tmp_path, run):
    file, lines = BAD_MANIFESTS[name]
    manifest = _manifest(tmp_path, file, lines)
    line = one_error(*run("train", base_spec, *SMALL, "--data", manifest, "--run-dir", tmp_path / "run"))
    if name not in ("unknown_extension", "no_rows", "no_validation_rows", "csv_empty"):
        assert f"{manifest}:" in line, line


@pytest.mark.parametrize("kind", ["fifo", "huge", "non_utf8", "device"])
def test_manifest_files_that_are_not_text(kind, base_spec, tmp_path, run):
    manifest = tmp_path / "m.jsonl"
    if kind == "fifo":
        os.mkfifo(manifest)
    elif kind == "huge":
        _sparse(manifest, 8 * GiB, GOOD_ROW.encode() + b"\n")
    elif kind == "non_utf8":
        manifest.write_bytes(b'{"path": "\xff.mp4", "label": 1, "split": "val"}\n')
    else:
        manifest.symlink_to("/dev/zero")
    one_error(*run("train", base_spec, *SMALL, "--data", manifest, "--run-dir", tmp_path / "run"))


def test_a_fifo_named_in_a_manifest_is_skipped_not_waited_for(tmp_path):
    from avdsl.runtime.contracts import InputSpec
    from avdsl.runtime.data.media import MediaDataset

    os.mkfifo(tmp_path / "clip.mp4")
    manifest = _manifest(tmp_path, "m.jsonl", ['{"path": "clip.mp4", "label": 1}'])
    data = MediaDataset(manifest, [InputSpec("label", "label", (), 4)], split="train")
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="not a regular file"):
        assert data[0] is None
    assert time.perf_counter() - t0 < 1.0


# --------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real one-step run of the corpus' base spec (its newest checkpoint folder)."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "base.yaml").write_text(BASE)
    code = cli.main(["train", str(folder / "base.yaml"), *SMALL, "--run-dir", str(folder / "run")])
    assert code == 0
    return folder / "run" / "step-000001"


def _tamper(checkpoint: Path, tmp_path: Path, kind: str) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    weights, state = target / "model.safetensors", target / "state.pt"
    raw = weights.read_bytes()
    if kind == "header_lies":
        weights.write_bytes((2**40).to_bytes(8, "little") + raw[8:])
    elif kind == "header_not_json":
        n = int.from_bytes(raw[:8], "little")
        weights.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    elif kind == "offsets_past_end":
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"] = [0, 10**12]
        text = json.dumps(header).encode()
        weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    elif kind == "weights_truncated":
        weights.write_bytes(raw[: len(raw) // 2])
    elif kind == "state_truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif kind == "state_not_a_zip":
        state.write_bytes(b"not a torch file")
    elif kind == "meta_list":
        (target / "meta.json").write_text("[]")
    elif kind == "meta_huge":
        _sparse(target / "meta.json", 2 * GiB, b"{")
    elif kind == "spec_huge":
        _sparse(target / "spec.yaml", 8 * GiB)
    elif kind == "spec_fifo":
        (target / "spec.yaml").unlink()
        os.mkfifo(target / "spec.yaml")
    elif kind == "spec_other_model":
        (target / "spec.yaml").write_text(BASE.replace("width: 32", "width: 64"))
    elif kind == "spec_injection":
        (target / "spec.yaml").write_text(BASE.replace("name: hostile", "name: \"x\\nimport os\""))
    elif kind == "spec_missing":
        (target / "spec.yaml").unlink()
    elif kind == "weights_are_a_fifo":
        weights.unlink()
        os.mkfifo(weights)
    return target


TAMPERED = ["header_lies", "header_not_json", "offsets_past_end", "weights_truncated", "state_truncated",
            "state_not_a_zip", "meta_list", "meta_huge", "spec_huge", "spec_fifo", "spec_other_model",
            "spec_injection", "spec_missing", "weights_are_a_fifo"]


@pytest.mark.parametrize("kind", TAMPERED)
def test_eval_of_a_tampered_checkpoint(kind, trained, tmp_path, run):
    target = _tamper(trained, tmp_path, kind)
    one_error(*run("eval", target, "--batches", "1", "--batch-size", "2"))


@pytest.mark.parametrize("kind", ["header_lies", "state_truncated", "offsets_past_end"])
def test_resume_from_a_tampered_checkpoint(kind, trained, tmp_path, run):
    target = _tamper(trained, tmp_path, kind)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target.rename(run_dir / "step-000001")
    code, out, err = run("train", trained.parent.parent / "base.yaml", *SMALL, "--steps", "2", "--run-dir", run_dir, "--resume")
    assert code == 2 and "Traceback" not in err, err[-2000:]


def test_checkpoint_folder_named_as_code_is_not_run(trained, tmp_path, run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    target = tmp_path / INJECTION
    try:
        shutil.copytree(trained, target)
    except OSError:
        pytest.skip("the file system refuses newlines in names")
    code, out, err = run("eval", target, "--batches", "1", "--batch-size", "2", "--json")
    assert code == 0, err
    assert not marker.exists()


# --------------------------------------------------------------------------------------- faults


def test_disk_full_during_a_checkpoint_write(tmp_path, monkeypatch):
    """torch.save raises RuntimeError (not OSError) on a full disk: a clear error, no .tmp left behind."""
    import torch

    from avdsl.runtime.train import checkpoint as ckpt
    from avdsl.runtime.train.toy import TinyAV

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(ckpt.torch, "save", full)
    monkeypatch.setattr(ckpt, "_disk_full", lambda folder: True)
    with pytest.raises(ckpt.CheckpointWriteError, match="out of disk space"):
        ckpt.save_checkpoint(tmp_path, 1, TinyAV(), None, None, {}, "spec", "hash")
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob("step-*"))
    assert torch.is_tensor(torch.zeros(1))


def test_weights_that_turn_nan_are_never_checkpointed(tmp_path):
    """An update that leaves NaN weights (while the loss of that step was finite) ends the run with
    NonFiniteLoss instead of writing them over the last good checkpoint."""
    import torch
    from rich.console import Console
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from avdsl.runtime.train import NonFiniteLoss, TrainConfig, train
    from avdsl.runtime.train.toy import TinyAV, ToyAVDataset

    def poison(optimizer, args, kwargs):
        with torch.no_grad():
            optimizer.param_groups[0]["params"][0].fill_(float("nan"))

    config = TrainConfig(steps=2, batch_size=4, eval_every=0, checkpoint_every=1, run_dir=str(tmp_path / "run"),
                         warmup_steps=0, device="cpu")
    handle = register_optimizer_step_post_hook(poison)
    try:
        with pytest.raises(NonFiniteLoss, match="not finite"):
            train(TinyAV(), ToyAVDataset(16), ToyAVDataset(8), config, "spec", "hash", console=Console(quiet=True))
    finally:
        handle.remove()
    assert not list((tmp_path / "run").glob("step-*"))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_before_the_loop_says_so(base_spec, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.Popen([sys.executable, "-m", "avdsl", "train", str(base_spec), "--train-size", "200000",
                             "--val-size", "8", "--batch-size", "4", "--steps", "1", "--run-dir", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().startswith("training")  # the spec is loaded; the model and data come next
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (proc.returncode, err[-2000:])
    assert "terminated" in err and "Traceback" not in err


# ------------------------------------------------------------------------- real processes, capped

CAPPED = [  # (name, argv, address-space cap): avdsl's language side stays far below 1 GiB; torch needs more to load
    ("dev_zero", ["build", "/dev/zero"], GiB),
    ("huge_sparse_spec", ["build", "{tmp}/big.yaml"], GiB),
    ("alias_bomb", ["build", "{corpus}/alias_bomb_small.yaml"], GiB),
    ("set_alias_bomb", ["build", "{corpus}/set_alias_bomb.yaml", "--set", "name=" + "[&a [x, x, x, x, x, x, x, x, x, x], "
                        "&b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a], &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b], "
                        "&d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c], &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d], "
                        "[*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]]"], GiB),
    ("use_bomb", ["build", "{corpus}/rule_set_use_bomb.yaml"], GiB),
    ("many_rules", ["build", "{corpus}/routing_rules_too_many.yaml"], GiB),
    ("deep_and_wide", ["build", "{corpus}/depth_too_big_for_streams.yaml"], GiB),
    ("huge_var", ["build", "{corpus}/dim_huge_var.yaml"], GiB),
    ("int_4301_digits", ["build", "{corpus}/int_4301_digits.yaml"], GiB),
    ("diff_bad_revision", ["diff", "{corpus}/tau_zero.yaml@--output={tmp}/x", "tiny/zorro"], GiB),
    ("train_size_huge", ["train", "{corpus}/train_size_huge.yaml", "--steps", "1"], 4 * GiB),
    ("eval_huge_spec", ["eval", "{tmp}/ckpt"], 4 * GiB),
]


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed")
@pytest.mark.parametrize("name, argv, cap", CAPPED, ids=[c[0] for c in CAPPED])
def test_under_memory_cap(name, argv, cap, tmp_path):
    _sparse(tmp_path / "big.yaml", 8 * GiB)
    (tmp_path / "ckpt").mkdir()
    _sparse(tmp_path / "ckpt" / "spec.yaml", 8 * GiB)
    args = [a.format(tmp=tmp_path, corpus=CORPUS) for a in argv]
    code, out, err, seconds, peak = run_capped(args, cap, tmp_path)
    one_error(code, out, err)
    assert seconds < LIMIT_S + (10 if cap > GiB else 0), seconds  # a process that loads torch starts slower
    assert peak < GiB, peak
    MEASURED[name] = (seconds, peak)


MEASURED: dict = {}


def run_capped(argv: list[str], cap: int, cwd: Path) -> tuple[int, str, str, float, int]:
    """Run avdsl under `prlimit --as=cap` as a child of a small reaper that reports the child's
    resource usage (peak RSS) on its last stderr line."""
    reaper = ("import os, resource, subprocess, sys\n"
              "p = subprocess.run(sys.argv[1:])\n"
              "sys.stderr.write('\\nPEAK_RSS_KB %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
              "sys.exit(p.returncode)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", reaper, "prlimit", f"--as={cap}", sys.executable, "-m", "avdsl", *argv],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    err, _, peak = proc.stderr.rstrip().rpartition("\nPEAK_RSS_KB ")
    return proc.returncode, proc.stdout, err, seconds, int(peak) * 1024


def test_print_measurements(capsys):
    """Not a check: the slowest capped case and the largest peak memory (shown with -s)."""
    if not MEASURED:
        pytest.skip("no capped case ran")
    with capsys.disabled():
        slow = max(MEASURED.items(), key=lambda kv: kv[1][0])
        big = max(MEASURED.items(), key=lambda kv: kv[1][1])
        print(f"\ncapped cases: {len(MEASURED)}; slowest {slow[0]} {slow[1][0]:.2f} s; "
              f"largest peak RSS {big[0]} {big[1][1] / 2**20:.0f} MiB")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_a_step_that_never_ends_exits_promptly():
    """The loop's stop flag is only read between steps; a step blocked forever (a loader waiting on a
    file that never delivers) is ended by the watchdog after the grace period, with a message."""
    code = ("import os, signal, time\n"
            "from avdsl.runtime.train.loop import StopRequest\n"
            "with StopRequest(grace=0.5):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "grace period" in proc.stderr
    assert time.perf_counter() - t0 < 20


# --------------------------------------------------------------------------- memory, before building

HUGE = BASE.replace("width: 32", "width: 65536").replace("depth: 2", "depth: 1024")
BIG_INPUT = BASE.replace("fbank[B, 32, 16]", "fbank[B, 1000000, 1000]").replace("patch2d(8, 8)", "patch2d(1000, 1000)")


@pytest.mark.parametrize("text, argv", [(HUGE, ["build", "{spec}", "--compile"]),
                                        (HUGE, ["train", "{spec}", *SMALL, "--run-dir", "{run}"]),
                                        (BIG_INPUT, ["build", "{spec}", "--compile", "--batch", "64"])],
                         ids=["huge model: build --compile", "huge model: train", "huge inputs: build --compile"])
def test_a_model_that_cannot_fit_is_refused_before_building(text, argv, tmp_path, run):
    spec = tmp_path / "huge.yaml"
    spec.write_text(text)
    line = one_error(*run(*[a.format(spec=spec, run=tmp_path / "run") for a in argv]))
    assert "would need about" in line and "GiB" in line, line


def test_memory_estimate_grows_with_the_model():
    from avdsl.api import analyse_text
    from avdsl.passes.memory import estimate

    small, huge = analyse_text(BASE), analyse_text(HUGE)
    a, b = estimate(small.graph, small.cost, 8, True), estimate(huge.graph, huge.cost, 8, True)
    assert a.total < 1024**3 < b.total
    assert b.weights_bytes == 16 * huge.cost.total_params
    assert estimate(small.graph, small.cost, 8, False).total < a.total


def test_schema_maxima_agree_with_the_limits():
    from avdsl import limits
    from avdsl.schema import schema

    train = schema()["$defs"]["train"]["properties"]
    assert train["batch_size"]["maximum"] == limits.MAX_BATCH
    assert train["steps"]["maximum"] == limits.MAX_STEPS
    assert train["seed"]["maximum"] == limits.MAX_SEED
    assert train["workers"]["maximum"] == limits.MAX_WORKERS
    assert train["lr"]["maximum"] == limits.MAX_LR
    assert train["eval_batches"]["maximum"] == limits.MAX_EVAL_BATCHES
    assert train["train_size"]["maximum"] == train["val_size"]["maximum"] == limits.MAX_SYNTHETIC_CLIPS
