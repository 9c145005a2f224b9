"""The runtime's attention call (runtime/attention.py): fp32 for CPU bf16 attentions over few keys."""
import pytest
import torch
import torch.nn.functional as F

from avdsl.runtime.attention import CPU_FP32_KEYS, in_fp32, sdpa


def _qkv(tokens: int, width: int, dtype=torch.bfloat16):
    torch.manual_seed(0)
    return [torch.randn(2, 4, tokens, width, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("mask", ["none", "causal", "boolean"])
def test_a_bf16_attention_over_few_keys_is_computed_in_fp32(mask):
    q, k, v = _qkv(40, 32)
    assert in_fp32(q, k)
    options = {"none": {}, "causal": {"is_causal": True},
               "boolean": {"attn_mask": torch.rand(40, 40, generator=torch.Generator().manual_seed(1)) > 0.3}}[mask]
    y = sdpa(q, k, v, **options)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options).bfloat16()
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected)
    assert not torch.equal(y, F.scaled_dot_product_attention(q, k, v, **options))  # the bf16 kernel differs
    y.sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad).all()


def test_under_autocast_the_fp32_attention_is_not_cast_back():
    q, k, v = _qkv(40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sdpa(q, k, v)
    assert torch.equal(y, F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16())


def test_many_keys_and_fp32_models_call_sdpa_unchanged():
    width = 64
    tokens = CPU_FP32_KEYS // width + 1
    q, k, v = _qkv(tokens, width)
    assert not in_fp32(q, k)
    assert torch.equal(sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))
    q, k, v = _qkv(40, 32, torch.float32)
    assert not in_fp32(q, k)
    assert torch.equal(sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_the_limit_counts_keys_times_head_width():
    q, k, _ = _qkv(CPU_FP32_KEYS // 32, 32)  # twice the tokens of width 64 at the same limit
    assert in_fp32(q, k)
    q, k, _ = _qkv(CPU_FP32_KEYS // 64 + 1, 64)
    assert not in_fp32(q, k)
