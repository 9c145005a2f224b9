"""A compile cache keyed by spec: rebuilding an unchanged spec does not pay the inductor compile again.

`torch.compile` always re-traces the Python (Dynamo, seconds), but the expensive part on CPU is
AOTAutograd + inductor code generation and the C++ compile of the generated kernels. PyTorch can
export everything it compiled in this process as one blob (`torch.compiler.save_cache_artifacts`) and
pre-load such a blob into its local caches (`torch.compiler.load_cache_artifacts`). We store one blob
per (spec hash, precision, batch, torch version) under the cache dir, so a warm rebuild is a trace plus
cache hits. The key includes everything that changes the compiled graphs; a stale or corrupt blob is
ignored (it only costs the cold compile).
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
