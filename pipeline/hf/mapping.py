"""Tensor mapping between HF NemotronH safetensors and megatron-core dist-checkpoint keys.

Both sides are named in their on-disk vocabulary: HF as the Hub files name tensors (``backbone.*``, one
tensor per routed expert), megatron-core as ``model.sharded_state_dict()`` keys them (TE names for the
fused norms, Mamba ``in_proj``/``conv1d`` split into ``z/x/B/C/dt`` pieces, routed experts stacked on a
leading expert axis). A ``Link`` ties a few tensors of one side to a few of the other with the two
conversions; ``links(model)`` lists them all, in HF file order. Layouts (verified against transformers'
``NemotronHMamba2Mixer`` / ``NemotronHAttention`` and megatron-core's ``MambaMixer`` / ``SelfAttention``):

- Mamba ``in_proj`` rows: HF ``[z (gate), x, B, C, dt]`` = megatron's order; conv1d channels ``[x, B, C]``.
- attention: megatron's ``linear_qkv`` rows are interleaved per KV group ``[q heads of g, k_g, v_g]``;
  HF keeps separate ``q_proj``/``k_proj``/``v_proj``.
- MoE: HF ``gate.weight`` / ``gate.e_score_correction_bias`` = megatron ``router.weight`` / ``expert_bias``;
  ``up_proj``/``down_proj`` = ``linear_fc1``/``linear_fc2`` (non-gated squared ReLU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from pipeline.config.schema import ModelConfig

Convert = Callable[[List[torch.Tensor]], List[torch.Tensor]]


@dataclass(frozen=True)
class Link:
    mcore: Tuple[str, ...]  # dist-checkpoint keys
    hf: Tuple[str, ...]  # HF tensor names
    to_mcore: Convert
    to_hf: Convert
    expert: Optional[int] = None  # index on the mcore tensors' leading expert axis; None = whole tensors


def _same(ts):
    return list(ts)


def _split_rows(sizes: Sequence[int]) -> Tuple[Convert, Convert]:
    return (lambda ts: list(torch.split(ts[0], list(sizes), dim=0)),
            lambda ts: [torch.cat(ts, dim=0)])


def _qkv(m: ModelConfig) -> Tuple[Convert, Convert]:
    g, hd = m.num_query_groups, m.attention_head_dim
    q_per_g = m.num_attention_heads // g * hd

    def to_mcore(ts):
        q, k, v = ts
        h = q.shape[-1]
        return [torch.cat([q.reshape(g, q_per_g, h), k.reshape(g, hd, h), v.reshape(g, hd, h)], 1).reshape(-1, h)]

    def to_hf(ts):
        h = ts[0].shape[-1]
        q, k, v = torch.split(ts[0].reshape(g, q_per_g + 2 * hd, h), [q_per_g, hd, hd], dim=1)
        return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]

    return to_mcore, to_hf


def _one(mcore: str, hf: str, expert: Optional[int] = None) -> Link:
    return Link((mcore,), (hf,), _same, _same, expert)


def layer_links(kind: str, i: int, m: ModelConfig) -> List[Link]:
    mc, hf = f"decoder.layers.{i}.", f"backbone.layers.{i}."
    if kind == "M":
        d_inner = m.mamba_num_heads * m.mamba_head_dim
        bc = m.mamba_num_groups * m.mamba_state_dim
        in_proj = _split_rows([d_inner, d_inner, bc, bc, m.mamba_num_heads])
        conv = _split_rows([d_inner, bc, bc])
        return [
            _one(mc + "mixer.in_proj.layer_norm_weight", hf + "norm.weight"),
            _one(mc + "mixer.A_log", hf + "mixer.A_log"),
            _one(mc + "mixer.D", hf + "mixer.D"),
            Link(tuple(mc + f"mixer.conv1d.bias.{p}" for p in "xBC"), (hf + "mixer.conv1d.bias",), *conv),
            Link(tuple(mc + f"mixer.conv1d.weight.{p}" for p in "xBC"), (hf + "mixer.conv1d.weight",), *conv),
            _one(mc + "mixer.dt_bias", hf + "mixer.dt_bias"),
            Link(tuple(mc + f"mixer.in_proj.weight.{p}" for p in ("z", "x", "B", "C", "dt")),
                 (hf + "mixer.in_proj.weight",), *in_proj),
            _one(mc + "mixer.norm.weight", hf + "mixer.norm.weight"),
            _one(mc + "mixer.out_proj.weight", hf + "mixer.out_proj.weight"),
        ]
    if kind == "*":
        return [
            _one(mc + "self_attention.linear_qkv.layer_norm_weight", hf + "norm.weight"),
            Link((mc + "self_attention.linear_qkv.weight",),
                 tuple(hf + f"mixer.{p}_proj.weight" for p in "qkv"), *_qkv(m)),
            _one(mc + "self_attention.linear_proj.weight", hf + "mixer.o_proj.weight"),
        ]
    if kind == "E":
        experts = []
        for e in range(m.num_experts):
            experts += [_one(mc + "mlp.experts.experts.linear_fc1.weight", hf + f"mixer.experts.{e}.up_proj.weight", e),
                        _one(mc + "mlp.experts.experts.linear_fc2.weight", hf + f"mixer.experts.{e}.down_proj.weight", e)]
        return [
            _one(mc + "pre_mlp_layernorm.weight", hf + "norm.weight"),
            _one(mc + "mlp.router.expert_bias", hf + "mixer.gate.e_score_correction_bias"),
            _one(mc + "mlp.router.weight", hf + "mixer.gate.weight"),
            *experts,
            _one(mc + "mlp.shared_experts.linear_fc1.weight", hf + "mixer.shared_experts.up_proj.weight"),
            _one(mc + "mlp.shared_experts.linear_fc2.weight", hf + "mixer.shared_experts.down_proj.weight"),
        ]
    if kind == "-":
        return [
            _one(mc + "mlp.linear_fc1.layer_norm_weight", hf + "norm.weight"),
            _one(mc + "mlp.linear_fc1.weight", hf + "mixer.up_proj.weight"),
            _one(mc + "mlp.linear_fc2.weight", hf + "mixer.down_proj.weight"),
        ]
    raise ValueError(f"layer symbol {kind!r} has no NemotronH mapping")


def links(m: ModelConfig, layers: Optional[Sequence[int]] = None) -> List[Link]:
    """Every link of the model (or of ``layers`` only, without embedding / final norm / head)."""
    body = [link for i in (range(len(m.pattern)) if layers is None else layers)
            for link in layer_links(m.pattern[i], i, m)]
    if layers is not None:
        return body
    head = [] if m.tie_embeddings else [_one("output_layer.weight", "lm_head.weight")]
    return [_one("embedding.word_embeddings.weight", "backbone.embeddings.weight"), *body,
            _one("decoder.final_norm.weight", "backbone.norm_f.weight"), *head]


def mcore_shapes(m: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Global shape of every megatron-core checkpoint tensor the mapping covers (expert axis included)."""
    h, d_inner = m.hidden_size, m.mamba_num_heads * m.mamba_head_dim
    bc, k = m.mamba_num_groups * m.mamba_state_dim, m.mamba_conv_kernel
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * m.attention_head_dim
    per_kind = {
        "M": {"mixer.in_proj.layer_norm_weight": (h,), "mixer.A_log": (m.mamba_num_heads,),
              "mixer.D": (m.mamba_num_heads,), "mixer.dt_bias": (m.mamba_num_heads,),
              "mixer.conv1d.bias.x": (d_inner,), "mixer.conv1d.bias.B": (bc,), "mixer.conv1d.bias.C": (bc,),
              "mixer.conv1d.weight.x": (d_inner, 1, k), "mixer.conv1d.weight.B": (bc, 1, k),
              "mixer.conv1d.weight.C": (bc, 1, k), "mixer.in_proj.weight.z": (d_inner, h),
              "mixer.in_proj.weight.x": (d_inner, h), "mixer.in_proj.weight.B": (bc, h),
              "mixer.in_proj.weight.C": (bc, h), "mixer.in_proj.weight.dt": (m.mamba_num_heads, h),
              "mixer.norm.weight": (d_inner,), "mixer.out_proj.weight": (h, d_inner)},
        "*": {"self_attention.linear_qkv.layer_norm_weight": (h,), "self_attention.linear_qkv.weight": (qkv, h),
              "self_attention.linear_proj.weight": (h, m.num_attention_heads * m.attention_head_dim)},
        "E": {"pre_mlp_layernorm.weight": (h,), "mlp.router.expert_bias": (m.num_experts,),
              "mlp.router.weight": (m.num_experts, h),
              "mlp.experts.experts.linear_fc1.weight": (m.num_experts, m.moe_ffn_hidden_size, h),
              "mlp.experts.experts.linear_fc2.weight": (m.num_experts, h, m.moe_ffn_hidden_size),
              "mlp.shared_experts.linear_fc1.weight": (m.moe_shared_expert_ffn_hidden_size, h),
              "mlp.shared_experts.linear_fc2.weight": (h, m.moe_shared_expert_ffn_hidden_size)},
        "-": {"mlp.linear_fc1.layer_norm_weight": (h,), "mlp.linear_fc1.weight": (m.ffn_hidden_size, h),
              "mlp.linear_fc2.weight": (h, m.ffn_hidden_size)},
    }
    shapes = {"embedding.word_embeddings.weight": (m.vocab_size, h), "decoder.final_norm.weight": (h,)}
    if not m.tie_embeddings:
        shapes["output_layer.weight"] = (m.vocab_size, h)
    for i, s in enumerate(m.pattern):
        shapes.update({f"decoder.layers.{i}.{k}": v for k, v in per_kind[s].items()})
    return shapes


def hf_shapes(m: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Shape of every HF tensor, derived by running each link's ``to_hf`` on meta tensors."""
    mshapes, out = mcore_shapes(m), {}
    for link in links(m):
        metas = [torch.empty(mshapes[k][1:] if link.expert is not None else mshapes[k], device="meta")
                 for k in link.mcore]
        out.update({n: tuple(t.shape) for n, t in zip(link.hf, link.to_hf(metas))})
    return out
