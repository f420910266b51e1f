"""The PyTorch stand-in for causal-conv1d (te_kernels/causal_conv1d_torch.py) against an independent causal
convolution written as a sum of shifted products: forward, SiLU, and the extension's backward contract (dx written
into the caller's buffer, dweight, dbias)."""

import pytest
import torch
import torch.nn.functional as F

from te_kernels.causal_conv1d_torch import causal_conv1d_bwd, causal_conv1d_fn, causal_conv1d_fwd


def reference(x, weight, bias, silu):
    """out[b, d, t] = bias[d] + sum_k weight[d, k] x[b, d, t - (w - 1) + k], x = 0 before the start."""
    w = weight.shape[-1]
    padded = F.pad(x, (w - 1, 0))
    y = sum(weight[None, :, k, None] * padded[..., k:k + x.shape[-1]] for k in range(w)) + bias[None, :, None]
    return F.silu(y) if silu else y


@pytest.mark.parametrize("silu", [False, True])
def test_standin_matches_a_shifted_sum_forward_and_backward(silu):
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 6, 11, generator=gen), torch.randn(6, 4, generator=gen)
    bias = torch.randn(6, generator=gen)
    dout = torch.randn(2, 6, 11, generator=gen)
    want = reference(x, weight, bias, silu)
    torch.testing.assert_close(causal_conv1d_fwd(x, weight, bias, None, None, None, silu), want)
    torch.testing.assert_close(causal_conv1d_fn(x, weight, bias, activation="silu" if silu else None), want)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    reference(*leaves, silu).backward(dout)
    buffer = torch.full_like(x, float("nan"))  # mamba-ssm hands a view of its input gradient and reads it back
    dx, dweight, dbias, dinit = causal_conv1d_bwd(x, weight, bias, dout, None, None, None, buffer, False, silu)
    assert dx is buffer and dinit is None
    for got, want in zip((buffer, dweight, dbias), leaves):
        torch.testing.assert_close(got, want.grad, rtol=1e-5, atol=1e-5)
