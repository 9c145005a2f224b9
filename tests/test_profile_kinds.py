"""The profile benchmark's split of a step into kinds of work (benchmarks/profile.py)."""
import pytest

from benchmarks.profile import KINDS, kind_of


@pytest.mark.parametrize("op, kind", [
    ("aten::mm", "linear layers (mm, addmm)"),
    ("aten::addmm", "linear layers (mm, addmm)"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention (SDPA; bmm, softmax)"),
    ("aten::bmm", "attention (SDPA; bmm, softmax)"),          # an explicit attention's products
    ("aten::_softmax_backward_data", "attention (SDPA; bmm, softmax)"),
    ("aten::_log_softmax_backward_data", "element-wise and the rest"),  # the loss, not attention
    ("aten::convolution_backward", "convolutions"),
    ("aten::_fused_adamw_", "optimizer (AdamW)"),
    ("aten::copy_", "copies and casts"),
    ("aten::to", "copies and casts"),
    ("aten::topk", "element-wise and the rest"),             # not "aten::to"
    ("aten::cat", "concatenate / stack"),
    ("aten::native_layer_norm_backward", "norms"),
    ("aten::gelu_backward", "element-wise and the rest"),
])
def test_each_operator_goes_to_its_kind_of_work(op, kind):
    assert kind_of(op) == kind


def test_the_last_kind_takes_whatever_is_left():
    assert KINDS[-1][1] == ("",)
    assert kind_of("aten::some_future_op") == KINDS[-1][0]
