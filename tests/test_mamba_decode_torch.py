"""The decode-step references (te_kernels/mamba_decode_torch.py) against whole-sequence computations: token by
token from a state, they continue what the chunked SSD scan / the causal convolution compute over the sequence,
batch rows reaching their state rows through the index map."""

import torch
import torch.nn.functional as F

from te_kernels.mamba_decode_torch import causal_conv1d_update, selective_state_update
from te_kernels.ssd_torch import mamba_chunk_scan_combined


def test_conv_steps_continue_the_causal_convolution():
    g = torch.Generator().manual_seed(0)
    b, length, d, w = 3, 10, 8, 4
    x = torch.randn(b, length, d, generator=g)
    weight, bias = torch.randn(d, w, generator=g), torch.randn(d, generator=g)
    full = F.silu(F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=w - 1, groups=d)[..., :length])
    order = torch.tensor([2, 0, 1])  # batch row i keeps its state in row order[i]
    state = torch.zeros(b, d, w)
    steps = [causal_conv1d_update(x[:, :4], state, weight, bias, "silu", order)]  # several tokens in one call
    steps += [causal_conv1d_update(x[:, t], state, weight, bias, "silu", order).unsqueeze(1) for t in range(4, length)]
    assert torch.allclose(torch.cat(steps, 1), full.transpose(1, 2), atol=1e-5)
    assert torch.equal(state[order], x[:, -w:].transpose(1, 2))  # each row's last w inputs


def test_state_updates_continue_the_chunked_scan():
    g = torch.Generator().manual_seed(1)
    b, length, prefix, h, p, groups, n = 2, 20, 12, 4, 3, 2, 5
    x = torch.randn(b, length, h, p, generator=g)
    dt = torch.randn(b, length, h, generator=g)
    A = -torch.exp(torch.randn(h, generator=g))
    B, C = torch.randn(b, length, groups, n, generator=g), torch.randn(b, length, groups, n, generator=g)
    D, dt_bias, z = torch.randn(h, generator=g), torch.randn(h, generator=g), torch.randn(b, length, h, p, generator=g)
    y_full, final = mamba_chunk_scan_combined(x, dt, A, B, C, 8, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                              return_final_states=True)
    _, state0 = mamba_chunk_scan_combined(x[:, :prefix], dt[:, :prefix], A, B[:, :prefix], C[:, :prefix], 8, D=D,
                                          z=z[:, :prefix], dt_bias=dt_bias, dt_softplus=True,
                                          return_final_states=True)
    order = torch.tensor([1, 0])
    state = torch.empty(b, h, p, n)
    state[order] = state0
    per_head = dict(A=A[:, None, None].expand(h, p, n), D=D[:, None].expand(h, p),
                    dt_bias=dt_bias[:, None].expand(h, p))
    ys = []
    for t0, t1 in ((prefix, prefix + 2), *((t, t + 1) for t in range(prefix + 2, length))):  # 2 tokens, then 1 by 1
        sl = slice(t0, t1)
        ys.append(selective_state_update(state, x[:, sl], dt[:, sl, :, None].expand(-1, -1, h, p), per_head["A"],
                                         B[:, sl], C[:, sl], per_head["D"], z[:, sl], per_head["dt_bias"],
                                         dt_softplus=True, state_batch_indices=order))
    assert torch.allclose(torch.cat(ys, 1), y_full[:, prefix:], atol=1e-5)
    assert torch.allclose(state[order], final, atol=1e-5)
