"""One-off: FlexAttention on CPU at a Zorro-size layer, against the planned SDPA groups.

FlexAttention needs `torch.compile` (inductor generates the kernel); this measures the compile time
and the steady-state time once, to decide whether it is worth using on CPU (it is not the default).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .attention import HEADS, WIDTH, ZORRO_COUNTS
from .timing import best_of_each


def run(batch: int = 1, reps: int = 5) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    counts = ZORRO_COUNTS
    total = sum(counts.values())
    stream = torch.cat([torch.full((n,), i) for i, n in enumerate(counts.values())])
    fusion = list(counts).index("fusion")

    def zorro(b, h, q, k):  # audio and video see themselves, fusion sees everything
        return (stream[q] == stream[k]) | (stream[q] == fusion)

    block_mask = create_block_mask(zorro, None, None, total, total, device="cpu")
    q, k, v = (torch.randn(batch, HEADS, total, WIDTH // HEADS) for _ in range(3))
    flex = torch.compile(flex_attention)
    start = time.perf_counter()
    flex(q, k, v, block_mask=block_mask)
    compile_s = time.perf_counter() - start
    bounds = torch.tensor([0] + list(counts.values())).cumsum(0).tolist()
    a, vid, f = (slice(bounds[i], bounds[i + 1]) for i in range(3))

    def planned():
        F.scaled_dot_product_attention(q[:, :, a], k[:, :, a], v[:, :, a])
        F.scaled_dot_product_attention(q[:, :, vid], k[:, :, vid], v[:, :, vid])
        F.scaled_dot_product_attention(q[:, :, f], k, v)

    dense_mask = torch.tensor([[bool(zorro(0, 0, i, j)) for j in range(total)] for i in range(total)])
    with torch.no_grad():
        t = best_of_each({"flex": lambda: flex(q, k, v, block_mask=block_mask), "planned_sdpa": planned,
                          "dense_masked_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)}, reps)
    return {"compile_s": compile_s, **{f"{name}_s": s for name, s in t.items()}}


if __name__ == "__main__":
    print(run())
