"""The Nano v3 recipe maps one-to-one onto transformers' NemotronH: config keys and parameter inventories
(names and shapes, no weights: both models are built on the meta device)."""

import torch

from conftest import NANO

ARCHITECTURE = ("num_layers", "pattern", "hidden_size", "vocab_size", "norm_eps", "tie_embeddings",
                "num_attention_heads", "num_query_groups", "attention_head_dim", "mamba_num_heads", "mamba_head_dim",
                "mamba_state_dim", "mamba_num_groups", "mamba_conv_kernel", "mamba_chunk_size", "ffn_hidden_size",
                "activation", "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size", "moe_topk",
                "moe_topk_scaling_factor", "moe_score_function", "moe_expert_bias", "max_sequence_length")


def hub_inventory(model) -> dict:
    """transformers' in-memory names -> the Hub file names (``backbone.``, one tensor per routed expert),
    i.e. the inverse of transformers' own nemotron_h checkpoint conversion."""
    out = {}
    for name, t in model.state_dict().items():
        name = name.replace("model.", "backbone.", 1) if name.startswith("model.") else name
        if name.endswith(("mixer.experts.up_proj", "mixer.experts.down_proj")):
            stem, proj = name.rsplit(".", 1)
            out.update({f"{stem}.{e}.{proj}.weight": tuple(t.shape[1:]) for e in range(t.shape[0])})
        else:
            out[name] = tuple(t.shape)
    return out


def test_nano_recipe_is_transformers_nemotron_h():
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from pipeline import parallel
    from pipeline.config import load_recipe
    from pipeline.hf import config as hf_config
    from pipeline.hf.dist_writer import meta_model, sharded_entries
    from pipeline.hf.mapping import hf_shapes, links, mcore_shapes
    from pipeline.model.params import count_model

    recipe = load_recipe(NANO, ["parallelism.tp=1", "parallelism.ep=1", "run.device=cpu"])
    m = recipe.model

    # config: every recipe key becomes the HF key transformers reads, and reads back unchanged
    hf_cfg = NemotronHConfig(**hf_config.hf_config_from_model(m))
    assert hf_cfg.hybrid_override_pattern == m.pattern and hf_cfg.num_hidden_layers == 52
    for ours, theirs in {**hf_config.KEYS, **hf_config.SOFT_KEYS}.items():
        assert getattr(hf_cfg, theirs) == (hf_config.ACTIVATIONS[m.activation] if ours == "activation"
                                           else getattr(m, ours)), ours
    back = hf_config.model_from_hf(hf_cfg.to_dict())
    assert {f: getattr(back, f) for f in ARCHITECTURE} == {f: getattr(m, f) for f in ARCHITECTURE}

    # HF side: transformers' own model vs the tensors our export writes
    with torch.device("meta"):
        theirs = hub_inventory(NemotronHForCausalLM(hf_cfg))
    ours = hf_shapes(m)
    assert sorted(set(theirs) ^ set(ours)) == []
    assert {k: v for k, v in theirs.items() if ours[k] != v} == {}
    params = sum(torch.Size(s).numel() for k, s in theirs.items() if not k.endswith("e_score_correction_bias"))
    assert params == count_model(m).total  # 31.58B (the expert bias is a buffer, not a parameter)

    # megatron side: the checkpoint keys and global shapes megatron-core's model saves vs the mapping
    parallel.initialize(recipe)
    tensors, _ = sharded_entries(meta_model(recipe, torch.bfloat16))
    saved = {t.key: tuple(t.global_shape) for t in tensors}
    assert saved == mcore_shapes(m)
    covered = {k for link in links(m) for k in link.mcore}
    assert covered == set(saved)
