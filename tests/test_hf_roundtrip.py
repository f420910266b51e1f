"""HF NemotronH -> our megatron model -> HF again, against transformers' ``NemotronHForCausalLM`` (fp32, CPU).

The parent is a seeded random tiny NemotronH built by transformers with every kind of block (Mamba-2,
GQA attention, MoE with shared expert, dense MLP), Mamba groups > 1 and every 1-D parameter (norms,
A_log, D, dt_bias, conv bias) and the router's expert bias perturbed, so a swapped or misplaced tensor
changes the logits. Its sizes are recipes/tiny.yaml's, so the import runs in check mode (no --derive).
"""

import os

import pytest
import torch

from conftest import TINY

PATTERN = "MEM*E-M*E"
OVERRIDES = [f"model.pattern={PATTERN}", f"model.num_layers={len(PATTERN)}"]
BLOCKS = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
TOL = 1e-4


def make_hf_parent(out_dir: str, seed: int = 0, pattern: str = PATTERN, hidden: int = 128, experts: int = 8):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = NemotronHConfig(
        vocab_size=512, hidden_size=hidden, layers_block_type=[BLOCKS[s] for s in pattern],
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=2 * hidden,
        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=32,
        n_routed_experts=experts, moe_intermediate_size=hidden // 2, moe_shared_expert_intermediate_size=hidden,
        num_experts_per_tok=2, routed_scaling_factor=2.5, max_position_embeddings=4096,
        # transformers' PyTorch Mamba path clamps dt at time_step_min; the CUDA kernels, vLLM and megatron
        # (time_step_limit = [0, inf]) do not. A tiny time_step_min keeps the clamp out of every prompt
        # here, so the comparison is of the mapping, not of that difference (docs/hf_interop.md).
        time_step_min=1e-8,
    )
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    model.save_pretrained(out_dir)
    return model


def hf_logits(model_or_dir, tokens):
    from transformers import NemotronHForCausalLM

    model = model_or_dir
    if isinstance(model_or_dir, str):
        model = NemotronHForCausalLM.from_pretrained(model_or_dir)
    with torch.no_grad():
        return model.eval()(tokens).logits


def recipe_for(root: str, *extra):
    from pipeline.config import load_recipe

    return load_recipe(TINY, [f"run.root={root}", "run.device=cpu", *OVERRIDES, *extra])


def our_logits(recipe, ckpt: str, tokens):
    """Logits of our model built at the recipe's layout with ``ckpt`` loaded (vocab shards gathered)."""
    from megatron.core import tensor_parallel

    from pipeline import parallel
    from pipeline.model.build import build_model
    from pipeline.training import checkpoint

    parallel.initialize(recipe)
    model = build_model(recipe).eval()
    checkpoint.load(ckpt, [model], load_rng=False)
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, position_ids, None)
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_parent")
    hf_dir = str(d / "hf")
    model = make_hf_parent(hf_dir)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))  # 2 SSD chunks of 32
    ref = hf_logits(model, tokens)
    assert ref.abs().max() > 0.5  # logits far from zero: the tolerance is a real test
    torch.save({"tokens": tokens, "logits": ref}, str(d / "ref.pt"))
    return {"hf": hf_dir, "tokens": tokens, "logits": ref, "ref": str(d / "ref.pt")}


def test_import_matches_transformers_and_export_round_trips(parent, tmp_path):
    from safetensors.torch import load_file

    from pipeline.cli import run
    from pipeline.training import checkpoint

    root = str(tmp_path / "runs")
    run(["import", "--recipe", TINY, "--hf", parent["hf"], f"run.root={root}", *OVERRIDES])
    ckpt = checkpoint.resolve(os.path.join(root, "tiny", "import", "checkpoints"))
    ours = our_logits(recipe_for(root), ckpt, parent["tokens"])
    d_import = (ours - parent["logits"]).abs().max().item()
    print(f"\nmax |logits ours - transformers| after import: {d_import:.3g}")
    assert d_import <= TOL

    out = str(tmp_path / "exported")
    run(["export", "--recipe", TINY, "--out", out, f"run.root={root}", *OVERRIDES])
    again = hf_logits(out, parent["tokens"])
    d_export, d_ours = (again - parent["logits"]).abs().max().item(), (again - ours).abs().max().item()
    print(f"max |logits exported - original| (transformers): {d_export:.3g}; exported - ours: {d_ours:.3g}")
    assert d_export <= TOL and d_ours <= TOL
    before, after = load_file(os.path.join(parent["hf"], "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)  # fp32 -> fp32: bit-exact
    import json

    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["hybrid_override_pattern"] == PATTERN and cfg["num_hidden_layers"] == len(PATTERN)
    assert os.path.isfile(os.path.join(out, "generation_config.json"))  # carried from the parent


def dist_worker(hf_dir: str, root: str, ref: str):
    """On each of 2 ranks: import at TP=2 and at EP=2, load at that layout, compare with transformers."""
    from torch.distributed.checkpoint import FileSystemReader

    from pipeline.hf.importer import import_hf

    data = torch.load(ref)
    results = {}
    for tp, ep in ((2, 1), (1, 2)):
        name = f"tp{tp}ep{ep}"
        recipe = recipe_for(root, f"run.name={name}", f"parallelism.tp={tp}", f"parallelism.ep={ep}")
        from pipeline import parallel

        parallel.initialize(recipe)
        ckpt = import_hf(recipe, hf_dir, os.path.join(root, name, "import"), progress=False)
        logits = our_logits(recipe, ckpt, data["tokens"])
        md = FileSystemReader(ckpt).read_metadata().state_dict_metadata
        results[name] = {
            "delta": (logits - data["logits"]).abs().max().item(),
            "ckpt": ckpt,
            "rank_files": sorted(n for n in os.listdir(ckpt) if n.endswith(".distcp")),
            "in_proj_z_chunks": len(md["decoder.layers.0.mixer.in_proj.weight.z"].chunks),
            "fc1_chunks": len(md["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"].chunks),
        }
    return results


def test_import_at_tp2_and_ep2_matches_transformers(parent, tmp_path):
    from dist_helpers import run_ranks

    root = str(tmp_path / "runs")
    results = run_ranks("test_hf_roundtrip:dist_worker", nproc=2, tmp_path=tmp_path,
                        kwargs={"hf_dir": parent["hf"], "root": root, "ref": parent["ref"]})
    for name, r in results[0].items():
        print(f"\n{name}: max |logits ours - transformers| = {r['delta']:.3g}")
        assert r["delta"] <= TOL and results[1][name]["delta"] <= TOL
        assert r["rank_files"] == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote their shards
    assert results[0]["tp2ep1"]["in_proj_z_chunks"] == 2  # TP-split shards, as the TP=2 model saves them
    assert results[0]["tp1ep2"]["fc1_chunks"] == 8  # one chunk per expert

    # written at TP=2, loaded into a single-rank model: megatron reshards
    ours = our_logits(recipe_for(root), results[0]["tp2ep1"]["ckpt"], parent["tokens"])
    delta = (ours - parent["logits"]).abs().max().item()
    print(f"written at TP=2, loaded at TP=1: max |logits ours - transformers| = {delta:.3g}")
    assert delta <= TOL
