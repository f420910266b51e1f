"""REAP expert scores and per-expert FFN channel statistics, from hooks on megatron's sequential experts.

REAP (Router-weighted Expert Activation Pruning): S_j = mean over the tokens x routed to expert j of
g_j(x) * ||f_j(x)||_2, where g_j(x) is the weight that combines expert j's output into the layer output and
f_j(x) the expert's output. megatron-core hands each local expert its routed tokens together with exactly that
weight (``permuted_probs``: for Nano v3 the sigmoid score of the expert, selected with the expert bias,
normalised over the top-k and times the scaling factor) and the expert multiplies it in before ``linear_fc2``
(``per_token_scale``): the expert module's output *is* g_j(x) * f_j(x). Its row norms are REAP's products
directly (g >= 0), no softmax recomputed anywhere. Under expert tensor parallelism the expert output is a
partial sum over the expert-TP ranks (the dispatcher reduces it later), so it is all-reduced before the norm.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps

from pipeline.elastic.importance.stats import EXPERT, Stat


def expert_stats(moe_layer: torch.nn.Module, handles: List) -> Dict[str, Stat]:
    """Register hooks on ``moe_layer``'s local experts; returns the statistics they fill:
    ``reap`` (g * ||f|| per expert), ``gate`` (g per expert), ``moe_ffn`` (|act(fc1)| per expert and channel).
    All three count the tokens routed to each expert."""
    config = moe_layer.config
    if config.moe_apply_probs_on_input:
        raise ValueError("REAP needs the expert output times its gate; moe_apply_probs_on_input scales the "
                         "expert input instead")
    if config.gated_linear_unit:
        raise ValueError("FFN channel scores assume non-gated experts (Nemotron-H squared ReLU)")
    local = list(moe_layer.experts.local_experts)
    device = local[0].linear_fc1.weight.device
    ffn_local = local[0].linear_fc1.weight.shape[0]
    n = len(local)
    stats = {
        "reap": Stat(EXPERT, (n,), device, count_shape=(n,)),
        "gate": Stat(EXPERT, (n,), device, count_shape=(n,)),
        "moe_ffn": Stat(EXPERT, (n, ffn_local), device, count_shape=(n,), channel_dim=1),
    }
    etp = ps.get_expert_tensor_parallel_group()
    etp_size = dist.get_world_size(etp)
    for i, expert in enumerate(local):
        handles.append(expert.register_forward_hook(_reap_hook(stats, i, etp if etp_size > 1 else None)))
        handles.append(expert.linear_fc1.register_forward_hook(_channel_hook(stats["moe_ffn"], i,
                                                                             expert.activation_func)))
    return stats


def _reap_hook(stats: Dict[str, Stat], i: int, etp_group):
    def hook(module, inputs, output):
        weighted = output[0].detach().float()  # g_j(x) * f_j(x), one row per routed token
        if etp_group is not None:
            weighted = weighted.clone()
            dist.all_reduce(weighted, group=etp_group)
        gate = inputs[1].detach().float()  # the combine weight megatron applied (per_token_scale)
        rows = weighted.shape[0]
        stats["reap"].add(weighted.norm(dim=-1).sum(), rows, index=i)
        stats["gate"].add(gate.sum(), rows, index=i)

    return hook


def _channel_hook(stat: Stat, i: int, activation):
    def hook(module, inputs, output):
        act = activation(output[0].detach().float())
        stat.add(act.abs().sum(0), act.shape[0], index=i)

    return hook
