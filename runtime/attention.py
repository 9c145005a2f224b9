"""The attention call every layer makes: ``scaled_dot_product_attention``, in fp32 where bf16 is slower.

On a CPU, PyTorch's flash-attention kernel is fast in bf16 going forward, but its backward in bf16 is
slower than the same backward in fp32 unless the keys are many: at CAV-MAE's shapes (128, 49 and 177
tokens of head width 64, 708 tokens of head width 32) a bf16 attention's forward and backward took
1.5x to 3.5x as long as casting Q, K, V to fp32, attending in fp32 and casting the result back, while
at Zorro's 1048 or MBT's 3136 tokens of width 64 bf16 is the faster (`python -m benchmarks
attention-dtype` measures both on this machine). So a bf16 attention on a CPU whose keys hold at most
`CPU_FP32_KEYS` values per head (keys x head width) runs in fp32. Everywhere else (fp32 models, GPUs,
many keys) this is exactly ``scaled_dot_product_attention``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CPU_FP32_KEYS = 400 * 64  # keys x head width up to which a CPU bf16 attention runs in fp32 (measured crossover)


def in_fp32(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True when this attention runs in fp32 although its inputs are bf16 (see the module docstring)."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and k.shape[-2] * k.shape[-1] <= CPU_FP32_KEYS


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
           is_causal: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v)`` over [B, heads, N, head width] tensors, in the inputs'
    dtype or, for a CPU bf16 attention over few keys, computed in fp32 and returned in bf16."""
    if not in_fp32(q, k):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    with torch.autocast("cpu", enabled=False):  # under autocast the fp32 inputs would be cast back
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask, is_causal=is_causal)
    return y.to(q.dtype)
