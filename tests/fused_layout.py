"""Transformer Engine's layer layout on the CPU: a backend whose pre-norms fuse into the next linear.

TE is not installable on CPU machines, but what the elastic model and the checkpoints must handle about it is
its *layout*: the Mamba / attention / dense-MLP pre-norm lives inside the first linear as ``layer_norm_weight``
(``TELayerNormColumnParallelLinear``), the norm kernel takes eps as a number, and the layer's own norm slot is
an ``IdentityOp``. ``FusedLocalBackend`` reproduces exactly that with megatron's local linears, so the spec
derivation, the eps-scaled hidden mask and cross-layout checkpoint loads run in CI; the TE kernels themselves
are covered on the GPU (tests/gpu/test_te_path.py).
"""

from __future__ import annotations

import torch

from megatron.core.tensor_parallel import ColumnParallelLinear

from pipeline.model.spec import LocalBackend


class NormColumnParallelLinear(ColumnParallelLinear):
    """RMSNorm (weight ``layer_norm_weight``, eps a number read at every forward) fused into a column-parallel
    linear: the module interface and checkpoint keys of TE's ``TELayerNormColumnParallelLinear``."""

    def __init__(self, input_size, output_size, *args, config, **kwargs):
        super().__init__(input_size, output_size, *args, config=config, **kwargs)
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        setattr(self.layer_norm_weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x, *args, **kwargs):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.layer_norm_weight.float()
        return super().forward(y.to(x.dtype), *args, **kwargs)


class FusedLocalBackend(LocalBackend):
    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self):
        return NormColumnParallelLinear


def fused_backend(monkeypatch) -> None:
    """Make ``build_model(..., use_te=False)`` build the fused (TE) layout for the rest of a test."""
    import pipeline.model.build as build

    monkeypatch.setattr(build, "get_backend", lambda use_te: FusedLocalBackend())
