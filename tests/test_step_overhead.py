"""What removing the reference step's overhead must not change (issue 17 item 6).

Speed is measured by ``benchmarks/step_overhead.py``, not here; these tests check the results.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from progan_fast import ops


# ----- the reference conv runs a 1x1 kernel on a 1x1 input (a dense layer) as one GEMM ------------

def dense_by_formula(x, w, b, scale, activation, pixel_norm):
    y = F.conv2d(x, w) * scale + b.view(1, -1, 1, 1)
    y = torch.where(y >= 0, y, 0.2 * y) if activation else y
    return y * torch.rsqrt(y.square().mean(dim=1, keepdim=True) + 1e-8) if pixel_norm else y


@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("pixel_norm", [True, False])
def test_reference_dense_layer_is_the_scaled_conv(activation, pixel_norm):
    x = torch.randn(5, 9, 1, 1, dtype=torch.float64)
    w, b = torch.randn(7, 9, 1, 1, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    got = ops.conv2d_bias_lrelu(x, w, b, 0.3, activation=activation, pixel_norm=pixel_norm, backend="reference")
    assert got.shape == (5, 7, 1, 1)
    torch.testing.assert_close(got, dense_by_formula(x, w, b, 0.3, activation, pixel_norm))


def test_reference_dense_layer_without_bias():
    x, w = torch.randn(3, 4, 1, 1, dtype=torch.float64), torch.randn(6, 4, 1, 1, dtype=torch.float64)
    got = ops.conv2d_bias_lrelu(x, w, None, 0.5, activation=False, backend="reference")
    torch.testing.assert_close(got, F.conv2d(x, w) * 0.5)


def test_reference_dense_layer_first_and_second_derivatives():
    """D's dense layers sit inside the gradient penalty: its double backward must be right too.
    The bias keeps pre-activations away from leaky-ReLU's kink, where finite differences lie."""
    def dense(x, w, b):
        return ops.conv2d_bias_lrelu(x, w, b, 0.3, backend="reference")

    x = torch.randn(3, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(4, dtype=torch.float64) + 5).requires_grad_()
    assert torch.autograd.gradcheck(dense, (x, w, b))
    assert torch.autograd.gradgradcheck(dense, (x, w, b))


def test_a_1x1_kernel_on_a_larger_input_is_still_a_conv():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    w, b = torch.randn(5, 3, 1, 1, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    got = ops.conv2d_bias_lrelu(x, w, b, 0.7, activation=False, backend="reference")
    torch.testing.assert_close(got, F.conv2d(x, w) * 0.7 + b.view(1, -1, 1, 1))
