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
    """Register hooks on ``moe_layer``'s experts; returns the statistics they fill: ``reap`` (g * ||f|| per
    expert), ``gate`` (g per expert), ``moe_ffn`` (|act(fc1)| per expert and channel). All three count the
    tokens routed to each expert. REAP needs one hook per layer (the sequential experts module sees every
    routed token, grouped by expert); the FFN channels one per expert (fc1's output lives only there)."""
    config = moe_layer.config
    if config.moe_apply_probs_on_input:
        raise ValueError("REAP needs the expert output times its gate; moe_apply_probs_on_input scales the "
                         "expert input instead")
    if config.gated_linear_unit:
        raise ValueError("FFN channel scores assume non-gated experts (Nemotron-H squared ReLU)")
    local = list(moe_layer.experts.local_experts)
    device = local[0].linear_fc1.weight.device
    n = len(local)
    stats = {
        "reap": Stat(EXPERT, (n,), device, count_shape=(n,)),
        "gate": Stat(EXPERT, (n,), device, count_shape=(n,)),
        "moe_ffn": Stat(EXPERT, (n, local[0].linear_fc1.weight.shape[0]), device, count_shape=(n,), channel_dim=1),
    }
    etp = ps.get_expert_tensor_parallel_group()
    handles.append(moe_layer.experts.register_forward_hook(
        _reap_hook(stats, n, etp if dist.get_world_size(etp) > 1 else None)))
    for i, expert in enumerate(local):
        handles.append(expert.linear_fc1.register_forward_hook(_channel_hook(stats["moe_ffn"], i,
                                                                             expert.activation_func)))
    return stats


def _reap_hook(stats: Dict[str, Stat], n: int, etp_group):
    def hook(module, inputs, output):
        # inputs: (tokens grouped by local expert, tokens per local expert, their combine weights g_j(x));
        # output[0]: g_j(x) * f_j(x) for every row
        tokens_per_expert, gate = inputs[1], inputs[2].detach()
        weighted = output[0].detach()
        if etp_group is not None:
            weighted = weighted.clone()
            dist.all_reduce(weighted, group=etp_group)
        counts = torch.as_tensor(tokens_per_expert, device=weighted.device)
        expert_of_row = torch.repeat_interleave(torch.arange(n, device=weighted.device), counts,
                                                output_size=weighted.shape[0])
        norms = torch.linalg.vector_norm(weighted, dim=-1, dtype=torch.float32)
        stats["reap"].add_segments(norms, expert_of_row, counts)
        stats["gate"].add_segments(gate.float(), expert_of_row, counts)
        stats["moe_ffn"].tokens += counts  # the channel hooks below only add sums (one kernel per expert)

    return hook


def _channel_hook(stat: Stat, i: int, activation):
    def hook(module, inputs, output):
        act = activation(output[0].detach())
        stat.total[i].add_(act.abs().sum(0, dtype=torch.float32))

    return hook
