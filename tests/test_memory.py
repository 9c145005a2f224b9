"""`avdsl.runtime.memory.keep_freed_memory`: large blocks freed by one step are reused by the next
instead of being mapped (and zero-filled) again by the kernel. Each case runs in a fresh process:
the thresholds are process-wide, and glibc moves its defaults as a process allocates."""
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")

# Rounds shaped like a training step: eight 16 MiB activations held at once (the forward), then all
# freed (the backward); prints the minor page faults per round once the first rounds have grown the heap.
ROUNDS = """
import ctypes, resource, sys, torch
from avdsl.runtime.memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
else:  # glibc's starting thresholds (128 KiB), held fixed: glibc's own adjustment varies from run to run
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) and libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
size = 4 * 1024 * 1024  # 16 MiB of fp32 = 4,096 pages of 4 KiB
def one_round():
    held = [torch.empty(size).fill_(1.0) for _ in range(8)]
    del held
for _ in range(6):
    one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    one_round()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_round(setting: str) -> float:
    done = subprocess.run([sys.executable, "-c", ROUNDS, setting], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def test_freed_activations_are_reused_without_page_faults():
    # with small thresholds every 16 MiB block is mapped afresh and zero-filled by the kernel each round
    # (8 x 4,096 pages); glibc's own defaults start there and adapt, in some runs well, in others not
    assert _faults_per_round("small") > 16000
    assert _faults_per_round("kept") < 100


def test_setting_twice_is_harmless():
    from avdsl.runtime.memory import keep_freed_memory

    assert keep_freed_memory() and keep_freed_memory()
