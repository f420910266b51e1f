"""The plain-PyTorch Mamba-2 kernels against their definitions (float64): chunked SSD vs the sequential
recurrence, chunk-size invariance, final state, gradients; the gated group RMSNorm against its formula."""

import torch
import torch.nn.functional as F

from te_kernels.gated_rmsnorm import gated_rmsnorm
from te_kernels.ssd_torch import mamba_chunk_scan_combined, ssd_sequential


def inputs(b=2, l=37, h=4, p=8, g=2, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    return dict(x=r(b, l, h, p), dt=r(b, l, h), A=-torch.rand(h, generator=gen, dtype=torch.float64) * 2,
                B=r(b, l, g, n), C=r(b, l, g, n), D=r(h), dt_bias=r(h) * 0.1)


def test_chunked_equals_sequential_with_padding_and_final_state():
    t = inputs()
    ref, ref_state = ssd_sequential(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], dt_bias=t["dt_bias"])
    for chunk in (4, 8, 37, 64):  # 37 % 4 != 0 exercises padding
        y, state = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"],
                                             dt_bias=t["dt_bias"], dt_softplus=True, return_final_states=True)
        assert (y - ref).abs().max() < 1e-9
        assert (state - ref_state).abs().max() < 1e-9


def test_gate_and_initial_state():
    t = inputs(l=16)
    z = torch.randn_like(t["x"])
    first, s1 = mamba_chunk_scan_combined(t["x"][:, :8], t["dt"][:, :8], t["A"], t["B"][:, :8], t["C"][:, :8], 4,
                                          D=t["D"], dt_softplus=True, return_final_states=True)
    second = mamba_chunk_scan_combined(t["x"][:, 8:], t["dt"][:, 8:], t["A"], t["B"][:, 8:], t["C"][:, 8:], 4,
                                       D=t["D"], dt_softplus=True, initial_states=s1)
    whole = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 4, D=t["D"], dt_softplus=True)
    assert (torch.cat([first, second], 1) - whole).abs().max() < 1e-9
    gated = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 4, D=t["D"], z=z, dt_softplus=True)
    assert (gated - whole * F.silu(z)).abs().max() < 1e-12


def test_gradients_match_sequential():
    t = inputs(l=12)
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    y = mamba_chunk_scan_combined(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 4,
                                  D=leaves["D"], dt_bias=leaves["dt_bias"], dt_softplus=True)
    y.square().sum().backward()
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    ref, _ = ssd_sequential(ref_leaves["x"], ref_leaves["dt"], ref_leaves["A"], ref_leaves["B"], ref_leaves["C"],
                            D=ref_leaves["D"], dt_bias=ref_leaves["dt_bias"])
    ref.square().sum().backward()
    for k in t:
        assert (leaves[k].grad - ref_leaves[k].grad).abs().max() < 1e-8, k


def test_gated_rmsnorm_per_group():
    x, z, w = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    y = gated_rmsnorm(x, w, z, eps=1e-5, group_size=8)
    g = (x * F.silu(z)).reshape(3, 5, 2, 8)
    ref = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(3, 5, 16) * w
    assert (y - ref).abs().max() < 1e-12
