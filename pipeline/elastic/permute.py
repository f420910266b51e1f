"""Permute a live megatron-core HybridModel in place so every axis is sorted most-important-first.

Function-preserving: each axis' permutation is applied to every tensor that axis touches (METHOD §2), so
the permuted model computes the same function (up to float summation order). An order ``o`` means
``new[i] = old[o[i]]`` (``pipeline.elastic.importance.orders``).

- hidden: embedding columns, every residual-stream norm weight, the input dim of every in_proj / linear_qkv /
  linear_fc1 / router / expert fc1, the output dim of every out_proj / linear_proj / linear_fc2, the final
  norm, the LM head input. The hidden dim is never sharded, so this is local on every rank.
- attention heads (within KV groups): q rows of ``linear_qkv`` (interleaved per group as
  [q heads of g, k_g, v_g]) and the head's ``linear_proj`` columns. KV groups are whole on a TP rank: local.
- Mamba heads (within B/C groups) and each head's channels: ``in_proj`` z / x / dt rows, conv1d x channels,
  A_log, D, dt_bias, the gated norm's weight, ``out_proj`` columns. Mamba groups are whole on a TP rank: local.
- FFN channels (dense, shared expert, each routed expert on its own): fc1 rows, fc2 columns. Sharded over
  (expert) TP: gathered, permuted and re-split one tensor at a time.
- experts: router rows, expert bias, the experts themselves; across EP ranks one expert tensor at a time.

Everything runs under ``torch.no_grad`` on every rank of the model (collectives inside).
"""

from __future__ import annotations

from typing import Dict, List, Set

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.utils import unwrap_model

from pipeline.elastic.importance.layers import stack_layers
from pipeline.elastic.importance.orders import Orders
from pipeline.elastic.importance.stats import gather

# Parameters no hidden channel touches (Mamba's inner dims); anything else must be in the hidden plan.
HIDDEN_FREE = ("mixer.conv1d_weight", "mixer.conv1d_bias", "mixer.dt_bias", "mixer.A_log", "mixer.D",
               "mixer.norm.weight")


def take(t: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    """``t`` (a parameter or buffer) reordered along ``dim`` in place."""
    t.data.copy_(t.data.index_select(dim, index.to(t.device)))


def take_sharded(t: torch.Tensor, dim: int, index: torch.Tensor, group) -> None:
    """``t`` is this rank's shard along ``dim`` of a tensor split over ``group``: gather it, reorder the
    full tensor with the global ``index``, keep this rank's shard."""
    size = dist.get_world_size(group)
    if size == 1:
        return take(t, dim, index)
    full = gather(t.data, dim, group)
    n = t.shape[dim]
    rank = dist.get_rank(group)
    t.data.copy_(full.index_select(dim, index.to(t.device)).narrow(dim, rank * n, n))


@torch.no_grad()
def permute_model(model: torch.nn.Module, pattern: str, orders: Orders) -> None:
    for layer in stack_layers(model, pattern):
        o = orders.layers.get(layer.index, {})
        if layer.kind == "M":
            _mamba(layer.module.mixer, o["mamba_heads"], o["mamba_head_channels"])
        elif layer.kind == "*":
            _attention(layer.module.self_attention, o["attention_heads"])
        elif layer.kind == "-":
            _ffn(layer.module.mlp, o["ffn"], ps.get_tensor_model_parallel_group())
        elif layer.kind == "E":
            _moe(layer.module.mlp, o)
    _hidden(model, pattern, orders.hidden)


def _local_block(order: torch.Tensor, n_local: int, rank: int) -> torch.Tensor:
    """This TP rank's slice of a global within-group order, as local indices (groups never straddle ranks)."""
    local = order[rank * n_local:(rank + 1) * n_local] - rank * n_local
    if local.min() < 0 or local.max() >= n_local:
        raise ValueError("a head order moves heads across tensor-parallel ranks (not within groups)")
    return local


def _mamba(mixer, head_order: torch.Tensor, channel_order: torch.Tensor) -> None:
    tp_rank = ps.get_tensor_model_parallel_rank()
    nh, p, d = mixer.nheads_local_tp, mixer.headdim, mixer.d_inner_local_tp
    heads = _local_block(head_order, nh, tp_rank)
    old_global = heads + tp_rank * nh
    # channel c of new head i <- channel channel_order[old head][c] of old head heads[i]
    chans = (heads.unsqueeze(1) * p + channel_order[old_global]).reshape(-1)
    bc = 2 * mixer.ngroups_local_tp * mixer.d_state
    rows = torch.cat([chans, d + chans, 2 * d + torch.arange(bc), 2 * d + bc + heads])  # [z, x, B, C, dt]
    take(mixer.in_proj.weight, 0, rows)
    conv = torch.cat([chans, d + torch.arange(bc)])  # conv channels [x, B, C]
    take(mixer.conv1d_weight, 0, conv)
    if mixer.conv1d_bias is not None:
        take(mixer.conv1d_bias, 0, conv)
    for t in (mixer.A_log, mixer.dt_bias):
        take(t, 0, heads)
    take(mixer.D, 0, chans if mixer.D.shape[0] == d else heads)
    take(mixer.norm.weight, 0, chans)
    take(mixer.out_proj.weight, 1, chans)


def _attention(attn, head_order: torch.Tensor) -> None:
    tp_rank = ps.get_tensor_model_parallel_rank()
    nh, ng = attn.num_attention_heads_per_partition, attn.num_query_groups_per_partition
    hd, q_per_group = attn.hidden_size_per_attention_head, nh // ng
    heads = _local_block(head_order, nh, tp_rank)
    rows = []
    for g in range(ng):
        base = g * (q_per_group + 2) * hd
        for j in range(q_per_group):
            old_in_group = int(heads[g * q_per_group + j]) - g * q_per_group
            rows.append(base + old_in_group * hd + torch.arange(hd))
        rows.append(base + q_per_group * hd + torch.arange(2 * hd))  # k_g, v_g stay
    take(attn.linear_qkv.weight, 0, torch.cat(rows))
    take(attn.linear_proj.weight, 1, (heads.unsqueeze(1) * hd + torch.arange(hd)).reshape(-1))


def _ffn(mlp, order: torch.Tensor, group) -> None:
    take_sharded(mlp.linear_fc1.weight, 0, order, group)
    take_sharded(mlp.linear_fc2.weight, 1, order, group)


def _moe(moe, o: Dict[str, torch.Tensor]) -> None:
    experts = o["experts"]
    router = moe.router
    take(router.weight, 0, experts)
    for name in ("expert_bias", "local_tokens_per_expert"):
        if getattr(router, name, None) is not None:
            take(getattr(router, name), 0, experts)
    local = list(moe.experts.local_experts)
    _move_experts(local, experts)
    ep_rank, n_local = ps.get_expert_model_parallel_rank(), len(local)
    etp = ps.get_expert_tensor_parallel_group()
    for i, expert in enumerate(local):
        old = int(experts[ep_rank * n_local + i])  # the expert now in slot i was expert `old`
        _ffn(expert, o["moe_ffn"][old], etp)
    if getattr(moe, "shared_experts", None) is not None:
        _ffn(moe.shared_experts, o["shared_expert_ffn"], ps.get_tensor_model_parallel_group())


def _move_experts(local: List[torch.nn.Module], order: torch.Tensor) -> None:
    """Global slot k takes old expert order[k]; experts live in blocks of len(local) per EP rank. One
    parameter name at a time: its new local stack is assembled from broadcasts by the owning ranks."""
    group = ps.get_expert_model_parallel_group()
    ep, rank, n = dist.get_world_size(group), dist.get_rank(group), len(local)
    for name, _ in local[0].named_parameters():
        params = [dict(e.named_parameters())[name] for e in local]
        new = [None] * n
        for k, old in enumerate(order.tolist()):
            src, dst = old // n, k // n
            # (a broadcast needs a buffer on every rank of the group, also where it is not kept)
            buf = params[old % n].data.clone() if src == rank else torch.empty_like(params[0].data)
            if ep > 1:
                dist.broadcast(buf, src=dist.get_global_rank(group, src), group=group)
            if dst == rank:
                new[k % n] = buf
        for p, t in zip(params, new):
            p.data.copy_(t)


def _hidden(model: torch.nn.Module, pattern: str, order: torch.Tensor) -> None:
    """Every parameter with a hidden dim, once (tied embeddings share a tensor); fails loudly if the model
    has a parameter this plan does not know (a permutation that silently skips one would break the model)."""
    bare = unwrap_model(model)
    plan: List = []  # (tensor, dim)

    def lin(m, hidden_dim):
        plan.append((m.weight, hidden_dim))
        if getattr(m, "bias", None) is not None and hidden_dim == 0:
            plan.append((m.bias, 0))

    if getattr(bare, "embedding", None) is not None:
        plan.append((bare.embedding.word_embeddings.weight, 1))
    for layer in stack_layers(model, pattern):
        mod = layer.module
        if layer.kind == "M":
            plan.append((mod.norm.weight, 0))
            lin(mod.mixer.in_proj, 1)
            lin(mod.mixer.out_proj, 0)
        elif layer.kind == "*":
            plan.append((mod.input_layernorm.weight, 0))
            lin(mod.self_attention.linear_qkv, 1)
            lin(mod.self_attention.linear_proj, 0)
        else:
            plan.append((mod.pre_mlp_layernorm.weight, 0))
            mlps = [mod.mlp] if layer.kind == "-" else list(mod.mlp.experts.local_experts)
            if layer.kind == "E":
                plan.append((mod.mlp.router.weight, 1))
                if getattr(mod.mlp, "shared_experts", None) is not None:
                    mlps.append(mod.mlp.shared_experts)
            for mlp in mlps:
                lin(mlp.linear_fc1, 1)
                lin(mlp.linear_fc2, 0)
    decoder = bare.decoder
    if getattr(decoder, "final_norm", None) is not None and decoder.post_process:
        plan.append((decoder.final_norm.weight, 0))
    head = getattr(bare, "output_layer", None)
    if head is not None and bare.post_process:
        plan.append((bare.shared_embedding_or_output_weight() if head.weight is None else head.weight, 1))
    done: Set[int] = set()
    for t, dim in plan:
        if id(t) not in done:
            done.add(id(t))
            take(t, dim, order)
    unknown = [n for n, p in bare.named_parameters() if id(p) not in done and not n.endswith(HIDDEN_FREE)]
    if unknown:
        raise RuntimeError(f"hidden permutation does not cover parameters {unknown[:4]}")
