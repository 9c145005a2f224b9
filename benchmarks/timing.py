"""Timing helpers shared by the benchmarks: best-of-N wall time and the machine's matmul peak."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository root, where `python -m benchmarks` runs


class ChildFailed(RuntimeError):
    """A benchmark child process exited with an error; the message is the last line of its stderr."""

    def __init__(self, message: str, stderr: str):
        super().__init__(message)
        self.stderr = stderr


def run_child(args: list[str], env: dict | None = None) -> dict:
    """``python -m benchmarks ARGS`` in a fresh process (one configuration whose memory and caches are
    its own); the JSON object it prints on its last line. Raises `ChildFailed`."""
    done = subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ) if env is None else env)
    if done.returncode:
        stderr = done.stderr.strip()
        raise ChildFailed(stderr.splitlines()[-1] if stderr else f"exit {done.returncode}", done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(fn, reps: int = 3, warmup: int = 1) -> float:
    """The fastest of ``reps`` calls of ``fn()`` in seconds, after ``warmup`` untimed calls. The
    minimum is the least noisy estimate on a shared machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_of_each(fns: dict, reps: int = 5, warmup: int = 1, min_seconds: float = 3.0) -> dict:
    """Like `best_of` for several functions, interleaved round by round so that load from other
    processes on a shared machine hits all of them alike; at least ``reps`` rounds and at least
    ``min_seconds`` in all, so fast calls get many tries. Returns {name: seconds}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    began, rounds = time.perf_counter(), 0
    while rounds < reps or time.perf_counter() - began < min_seconds:
        rounds += 1
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of the fastest single square matmul in ``dtype`` over a few seconds of tries (the
    practical peak of this machine; the best call, since other processes may share the cores)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    fastest = best_of(lambda: a @ b, reps=1)
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        fastest = min(fastest, best_of(lambda: a @ b, reps=1, warmup=0))
    return 2 * size ** 3 / fastest


def cpu_features() -> str:
    """PyTorch's CPU capability plus the bf16 matrix extensions the CPU announces (Linux /proc/cpuinfo):
    e.g. "AVX512 +amx_bf16 +avx512_bf16". Without either extension bf16 matmuls are emulated."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    extra = [f"+{f}" for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return " ".join([torch.backends.cpu.get_cpu_capability()] + extra)


def peak_memory_bytes(device: torch.device = torch.device("cpu")) -> int:
    """The most memory this process has held: max RSS on the CPU, max allocated on CUDA. Run one
    configuration per process to get that configuration's alone."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_tflops(peaks: dict, precision: str) -> float:
    """The matmul peak a precision's matrix products run at: bf16 for bf16 and bf16w, else fp32."""
    return peaks["bf16_tflops" if precision.startswith("bf16") else "fp32_tflops"]


def machine_peaks() -> dict:
    """fp32 and bf16 matmul peaks in TFLOP/s. bf16 uses a smaller matrix: on CPUs without native
    bf16 instructions it is emulated and a 1024 matmul takes seconds."""
    return {"fp32_tflops": matmul_peak(torch.float32) / 1e12,
            "bf16_tflops": matmul_peak(torch.bfloat16, size=512) / 1e12,
            "threads": torch.get_num_threads(), "cpu": cpu_features()}
