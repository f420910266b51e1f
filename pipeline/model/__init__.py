"""The hybrid model: specs, provider, parameter counter. No training logic here."""

from te_kernels.causal_conv1d_torch import register_causal_conv1d_standin
from te_kernels.mamba_ssm_compat import register_selective_scan_stub

register_selective_scan_stub()  # before megatron's Mamba mixer imports mamba-ssm (see te_kernels)
register_causal_conv1d_standin()  # GPU without causal-conv1d: unlocks megatron's memory-efficient Mamba path
