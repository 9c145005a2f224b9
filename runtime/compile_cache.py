"""A compile cache keyed by spec: rebuilding an unchanged spec does not pay the inductor compile again.

`torch.compile` always re-traces the Python (Dynamo, seconds), but the expensive part on CPU is
AOTAutograd + inductor code generation and the C++ compile of the generated kernels. PyTorch can
export everything it compiled in this process as one blob (`torch.compiler.save_cache_artifacts`) and
pre-load such a blob into its local caches (`torch.compiler.load_cache_artifacts`). We store one blob
per (spec hash, precision, batch, torch version) under the cache dir, so a warm rebuild is a trace plus
cache hits. The key includes everything that changes the compiled graphs; a stale or corrupt blob is
ignored (it only costs the cold compile).

Inductor also re-checks, in every process, which vector instruction sets this CPU and compiler can use;
`remember_vector_isa_checks` (run by `load`) keeps the checks that passed, see there.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


def default_dir() -> Path:
    """``$AVDSL_CACHE_DIR/compile``, else ``$XDG_CACHE_HOME/avdsl/compile``, else ``~/.cache/avdsl/compile``."""
    root = os.environ.get("AVDSL_CACHE_DIR")
    if root:
        return Path(root) / "compile"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "avdsl" / "compile"


@dataclass(frozen=True)
class CacheKey:
    """Everything that decides which graphs get compiled for a model."""

    spec_hash: str
    precision: str = "fp32"
    batch: int = 0
    mode: str = "train"  # train (forward + backward) or eval
    torch_version: str = torch.__version__

    def file_name(self) -> str:
        text = "|".join(str(v) for v in (self.spec_hash, self.precision, self.batch, self.mode, self.torch_version))
        return hashlib.sha256(text.encode()).hexdigest()[:24] + ".bin"


def load(key: CacheKey, directory: Path | None = None) -> bool:
    """Pre-load the artifacts stored for ``key`` into PyTorch's caches. True if there were any."""
    remember_vector_isa_checks((directory or default_dir()) / "vec-isa")
    path = (directory or default_dir()) / key.file_name()
    if not path.is_file():
        return False
    try:
        return torch.compiler.load_cache_artifacts(path.read_bytes()) is not None
    except Exception:  # a blob from another build of torch, or truncated: recompile instead
        return False


def save(key: CacheKey, directory: Path | None = None) -> Path | None:
    """Store what this process has compiled so far under ``key`` (atomic write). None if nothing."""
    result = torch.compiler.save_cache_artifacts()
    if result is None:
        return None
    blob, _info = result
    directory = directory or default_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / key.file_name()
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return path


def remember_vector_isa_checks(directory: Path) -> None:
    """Run each of inductor's CPU instruction-set checks once per machine instead of once per process.

    Before it uses AVX2, AVX-512 or AMX, inductor (torch 2.11) builds a small test library per
    instruction set (cached on disk) and loads it in a new Python process that imports torch: about ten
    such processes in every process that compiles or loads compiled kernels, ~1 s each on a quiet
    machine and most of a warm start (pytorch/pytorch#140970). Whether a library built by this compiler
    with these flags loads does not change from one process to the next, so a check that passed leaves a
    stamp in ``directory``, keyed by the fingerprint torch itself uses for the test build (compiler
    version, flags, torch version) and the test code; with the stamp the check is not run again. A check
    that failed runs again next time, as it does without this."""
    try:
        from torch._inductor import cpu_vec_isa  # private API: no public switch for this check (see above)

        check, fingerprint = cpu_vec_isa.VecISA.check_build, cpu_vec_isa._get_isa_dry_compile_fingerprint
    except (ImportError, AttributeError):  # another torch: its checks run as they are, only slower
        return
    if not getattr(check, "remembered", False):
        cpu_vec_isa.VecISA.check_build = remembering(check, directory, fingerprint)


def remembering(check, directory: Path, fingerprint):
    """``check(isa, code) -> bool`` that returns True without running ``check`` when it passed before."""
    def remembered(isa, code: str) -> bool:
        text = fingerprint(isa._arch_flags) + "\n" + code
        stamp = directory / (hashlib.sha256(text.encode()).hexdigest()[:24] + ".ok")
        if stamp.is_file():
            return True
        passed = check(isa, code)
        if passed:
            directory.mkdir(parents=True, exist_ok=True)
            stamp.touch()
        return passed

    remembered.remembered = True
    return remembered
