"""Plain-PyTorch references for megatron's two Mamba decode-step kernels (``megatron.core.ssm.ops``), so its
inference path runs on CPU through the same code as on the GPU.

megatron-core's own PyTorch fallbacks (used when the kernels are ``None``) squeeze the gate ``z`` but not the
output before the gated norm, which broadcasts a batch of b rows to b x b (they are only right at batch 1); these
follow the kernels' contracts instead: the same argument layouts, batch rows mapped to state rows by index, the
states updated in place. Speculative decoding's intermediate states are not supported.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _rows(indices: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
    return torch.arange(batch, device=device) if indices is None else indices.long()


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], silu_activation, conv_state_indices: Optional[torch.Tensor],
                         intermediate_conv_states: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``megatron.core.ssm.ops.causal_conv1d_triton.causal_conv1d_update``: x [b, s, d] (or [b, d]) new inputs,
    conv_state [B, d, w] the last w inputs of each state row (updated in place), weight [d, w]; returns the
    depthwise causal convolution at each new position [b, s, d] (SiLU when ``silu_activation``)."""
    if intermediate_conv_states is not None:
        raise NotImplementedError("the decode-step reference keeps no intermediate conv states (speculative decoding)")
    squeeze = x.dim() == 2
    x = x.unsqueeze(1) if squeeze else x
    rows = _rows(conv_state_indices, x.shape[0], x.device)
    state = conv_state[rows]
    out = []
    for t in range(x.shape[1]):
        state = torch.cat([state[..., 1:], x[:, t, :, None].to(state.dtype)], dim=-1)
        y = (state * weight).sum(-1) + (bias if bias is not None else 0)
        out.append(F.silu(y) if silu_activation else y)
    conv_state[rows] = state
    y = torch.stack(out, dim=1).to(x.dtype)
    return y.squeeze(1) if squeeze else y


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           C: torch.Tensor, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                           dt_bias: Optional[torch.Tensor] = None, dt_softplus: bool = False,
                           state_batch_indices: Optional[torch.Tensor] = None,
                           intermediate_ssm_states: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``megatron.core.ssm.ops.mamba_ssm.selective_state_update`` in the layout megatron's mixer calls it with:
    state [B, h, p, n] (updated in place), x / dt / z [b, s, h, p], A [h, p, n], B / C [b, s, g, n], D / dt_bias
    [h, p]. Per new token: dt' = softplus(dt + dt_bias); state = exp(A dt') state + dt' B x; y = C . state + D x,
    times SiLU(z). Returns y [b, s, h, p]."""
    if intermediate_ssm_states is not None:
        raise NotImplementedError("the decode-step reference keeps no intermediate SSM states (speculative decoding)")
    if state.dim() != 4 or x.dim() != 4:
        raise ValueError(f"expected state [B, h, p, n] and x [b, s, h, p], got {tuple(state.shape)} and "
                         f"{tuple(x.shape)}")
    rows = _rows(state_batch_indices, x.shape[0], x.device)
    heads_per_group = x.shape[2] // B.shape[2]
    s = state[rows].float()
    out = []
    for t in range(x.shape[1]):
        step = dt[:, t].float() + (dt_bias.float() if dt_bias is not None else 0)
        step = F.softplus(step) if dt_softplus else step
        b_t = B[:, t].float().repeat_interleave(heads_per_group, dim=1)  # [b, h, n]
        c_t = C[:, t].float().repeat_interleave(heads_per_group, dim=1)
        x_t = x[:, t].float()
        s = s * torch.exp(A.float() * step[..., None]) + (step * x_t)[..., None] * b_t[:, :, None, :]
        y = (s * c_t[:, :, None, :]).sum(-1)
        if D is not None:
            y = y + x_t * D.float()
        if z is not None:
            y = y * F.silu(z[:, t].float())
        out.append(y)
    state[rows] = s.to(state.dtype)
    return torch.stack(out, dim=1).to(x.dtype)
