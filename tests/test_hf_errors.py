"""Import / export refuse bad inputs with one line naming the tensor or key and both sides, write nothing
half-way, and map the layer pattern in every spelling (including the symbols other exporters trip on)."""

import json
import os

import pytest
import torch

from conftest import TINY, run_cli
from pipeline.errors import UserError

OVERRIDES = ["model.pattern=ME*-", "model.num_layers=4"]


def tiny_model():
    from pipeline.config import load_recipe

    return load_recipe(TINY, OVERRIDES).model


def write_hf_dir(path, model, drop=(), add=None, reshape=None, config_changes=None):
    """A NemotronH directory for ``model`` straight from the mapping's tensor list (random values)."""
    from safetensors.torch import save_file

    from pipeline.hf.config import hf_config_from_model
    from pipeline.hf.mapping import hf_shapes

    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=gen) for n, s in hf_shapes(model).items() if n not in drop}
    tensors.update(add or {})
    for name, shape in (reshape or {}).items():
        tensors[name] = torch.randn(shape, generator=gen)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = hf_config_from_model(model, dtype="float32")
    cfg.update(config_changes or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def check(path):
    from pipeline.config import load_recipe
    from pipeline.hf.importer import check_import

    return check_import(load_recipe(TINY, OVERRIDES), str(path))


def test_pattern_spellings_and_symbols():
    from pipeline.hf.config import hf_config_from_model, megatron_pattern_layers, pattern_from_hf

    for cfg in ({"layers_block_type": ["mamba", "moe", "attention", "mlp"]},
                {"layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"]},
                {"hybrid_override_pattern": "ME*-"}, {"hybrid_override_pattern": "ME|*-", "num_hidden_layers": 4}):
        assert pattern_from_hf(cfg) == "ME*-"
    assert megatron_pattern_layers("MEM*|EM*E", "p") == "MEM*EM*E"  # '|' = PP stage boundary, not a layer
    with pytest.raises(UserError, match=r"'/' at position 4"):
        megatron_pattern_layers("ME*-/*E", "p")
    with pytest.raises(UserError, match=r"layer 1 is 'G' \(gated delta net\)"):
        megatron_pattern_layers("MG*", "p")
    with pytest.raises(UserError, match=r"layers_block_type\[2\] = 'sliding_attention'"):
        pattern_from_hf({"layers_block_type": ["mamba", "moe", "sliding_attention"]})
    with pytest.raises(UserError, match="num_hidden_layers = 5 but the layer pattern has 4"):
        pattern_from_hf({"hybrid_override_pattern": "ME*-", "num_hidden_layers": 5})

    m = tiny_model()
    cfg = hf_config_from_model(m)
    assert cfg["hybrid_override_pattern"] == "ME*-" and "layers_block_type" not in cfg
    legacy = hf_config_from_model(m, base={"layers_block_type": ["mamba"], "bos_token_id": 7})
    assert legacy["layers_block_type"] == ["mamba", "moe", "attention", "mlp"] and legacy["bos_token_id"] == 7
    modern = hf_config_from_model(m, base={"layers_block_type": ["linear_attention"]})
    assert modern["layers_block_type"] == ["linear_attention", "moe", "full_attention", "mlp"]


def test_config_disagreements_name_key_and_both_values(tmp_path):
    m = tiny_model()
    with pytest.raises(UserError, match=r"config.json: hidden_size = 96 but recipe model.hidden_size = 128"):
        check(write_hf_dir(tmp_path / "a", m, config_changes={"hidden_size": 96}))
    with pytest.raises(UserError, match=r"config.json: layer pattern 'M\*E-' but recipe model.pattern = 'ME\*-'"):
        check(write_hf_dir(tmp_path / "b", m, config_changes={"hybrid_override_pattern": "M*E-"}))
    with pytest.raises(UserError, match=r"n_group = 4, but this pipeline's model computes n_group = 1"):
        check(write_hf_dir(tmp_path / "c", m, config_changes={"n_group": 4}))
    with pytest.raises(UserError, match=r"mlp_hidden_act = 'relu2' but recipe model.activation = 'gelu'"):
        from pipeline.config import load_recipe
        from pipeline.hf.importer import check_import

        check_import(load_recipe(TINY, OVERRIDES + ["model.activation=gelu"]), str(write_hf_dir(tmp_path / "d", m)))


def test_tensor_inventory_errors_name_the_tensor(tmp_path):
    m = tiny_model()
    gate = "backbone.layers.1.mixer.gate.weight"
    with pytest.raises(UserError, match=rf"tensor {gate} is missing .* needs shape \[8, 128\]"):
        check(write_hf_dir(tmp_path / "a", m, drop=[gate]))
    with pytest.raises(UserError, match=r"tensor mtp.layers.0.norm.weight has no place in the recipe's model"):
        check(write_hf_dir(tmp_path / "b", m, add={"mtp.layers.0.norm.weight": torch.ones(128)}))
    qkv = "backbone.layers.2.mixer.k_proj.weight"
    with pytest.raises(UserError, match=rf"tensor {qkv} has shape \[96, 128\] but the recipe's model needs \[64, 128\]"):
        check(write_hf_dir(tmp_path / "c", m, reshape={qkv: (96, 128)}))
    recipe, files = check(write_hf_dir(tmp_path / "ok", m))
    assert len(files.tensors) == 3 + 9 + (5 + 2 * 8) + 5 + 3


def test_cli_error_is_one_line_and_writes_nothing(tmp_path):
    hf = write_hf_dir(tmp_path / "hf", tiny_model(), add={"mtp.layers.0.norm.weight": torch.ones(128)})
    root = tmp_path / "runs"
    proc = run_cli("import", "--recipe", TINY, "--hf", str(hf), f"run.root={root}", *OVERRIDES, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {hf}: tensor mtp.layers.0.norm.weight has no place in the recipe's model (1 extra tensors in all)"]
    assert not root.exists()


def test_failure_while_writing_leaves_no_checkpoint(tmp_path):
    from pipeline.cli import run

    hf = write_hf_dir(tmp_path / "hf", tiny_model())
    weights = os.path.join(hf, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) - 1024)  # header intact, the last tensor's bytes cut short
    root = tmp_path / "runs"
    with pytest.raises(UserError, match="truncated while reading tensor"):
        run(["import", "--recipe", TINY, "--hf", str(hf), f"run.root={root}", *OVERRIDES])
    stage = root / "tiny" / "import"
    assert sorted(os.listdir(stage / "checkpoints")) == []  # no iter_*, no .partial, no latest marker
    assert not (stage / "hf").exists()


def test_export_checks_checkpoint_against_recipe():
    from pipeline.hf.exporter import check_checkpoint
    from pipeline.hf.mapping import mcore_shapes

    m = tiny_model()
    stored = {k: (v, torch.bfloat16) for k, v in mcore_shapes(m).items()}
    key = "decoder.layers.0.mixer.in_proj.weight.z"
    bad = dict(stored, **{key: ((64, 128), torch.bfloat16)})
    with pytest.raises(UserError, match=rf"tensor {key} has shape \[64, 128\] in the checkpoint but \[128, 128\] in"):
        check_checkpoint(bad, m, "ckpt")
    with pytest.raises(UserError, match="checkpoint lacks tensor output_layer.weight"):
        check_checkpoint({k: v for k, v in stored.items() if k != "output_layer.weight"}, m, "ckpt")
    extra = dict(stored, **{"decoder.layers.9.mixer.A_log": ((8,), torch.float32)})
    with pytest.raises(UserError, match="checkpoint tensor decoder.layers.9.mixer.A_log has no place"):
        check_checkpoint(extra, m, "ckpt")
    check_checkpoint(dict(stored, **{"optimizer.state.exp_avg": ((1,), torch.float32)}), m, "ckpt")
