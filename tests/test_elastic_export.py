"""``export`` of an elastic run and ``slice`` of its budgets, through the real CLI, on a tiny run dir.

The run: a seeded random NemotronH parent imported (every block kind), its checkpoint placed as stage 2's
with an ``elastic_budgets.json`` written by ``budgets_to_json`` (three nested budgets, one with a skipped
layer, plus a heterogeneous one). Checked: every sliced HF model's logits in transformers equal our
megatron model's at that budget, computed from the stage-2 checkpoint in memory (load -> HF tensors ->
slice -> megatron model of ``subnet.model_config``), fp32, max |d| <= 1e-4; ``--format megatron`` loads
and gives the same logits; smaller budgets are prefixes of larger ones on the written files; the storage
report equals the tensor bytes of the written files; user mistakes are one ``error:`` line, nothing written.
"""

import json
import os
import shutil

import pytest
import torch

from conftest import NANO, TINY
from data_prep import demo_corpus, demo_tokenizer
from test_hf_roundtrip import OVERRIDES, TOL, make_hf_parent, recipe_for
from test_slicing import budget_subnet, megatron_logits, megatron_model

BUDGETS = [("full", 1.0, budget_subnet(0)), ("medium", 0.6, budget_subnet(1)), ("small", 0.3, budget_subnet(2, [5]))]


def _budgets(m):
    from pipeline.elastic.subnet import ResolvedBudget

    out = [ResolvedBudget(n, f, s) for n, f, s in BUDGETS]
    hetero = budget_subnet(1)
    hetero.per_layer = {1: {"experts": 4}}
    return out + [ResolvedBudget("hetero", 0.5, hetero)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """import -> stage2 (copy) + elastic_budgets.json + the demo tokenizer -> export (the elastic dir)."""
    from pipeline.cli import run
    from pipeline.elastic.subnet import BUDGETS_FILE, budgets_to_json

    d = tmp_path_factory.mktemp("elastic_run")
    hf, root = str(d / "parent"), str(d / "runs")
    make_hf_parent(hf)
    args = [f"run.root={root}", *OVERRIDES]
    run(["import", "--recipe", TINY, "--hf", hf, *args])
    run_root = os.path.join(root, "tiny")
    shutil.copytree(os.path.join(run_root, "import"), os.path.join(run_root, "stage2"))
    m = recipe_for(root).model
    with open(os.path.join(run_root, "stage2", BUDGETS_FILE), "w") as f:
        json.dump(budgets_to_json(m, _budgets(m)), f)
    corpus = str(d / "chat.jsonl")
    demo_corpus.write_jsonl(corpus, "chat", 100, seed=3)
    demo_tokenizer.train_demo_tokenizer(os.path.join(run_root, "data", "tokenizer"), [corpus], 512, meta={})
    run(["export", "--recipe", TINY, *args])
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(5))
    return {"root": root, "args": args, "elastic": os.path.join(run_root, "elastic"), "model": m,
            "tokens": tokens, "ckpt": os.path.join(run_root, "stage2", "checkpoints", "iter_0000000"), "d": d}


def assert_special_tokens(config_path, tokenizer_dir):
    """config.json names the tokenizer's own eos / pad ids (and no bos: the demo BPE has none), so transformers'
    NemotronH defaults (bos 1, eos 2, pad 0) never stand in for them."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with open(config_path) as f:
        cfg = json.load(f)
    assert cfg["eos_token_id"] == tok.convert_tokens_to_ids(demo_tokenizer.EOS) == tok.eos_token_id
    assert cfg["pad_token_id"] == tok.convert_tokens_to_ids(demo_tokenizer.PAD) == tok.pad_token_id
    assert "bos_token_id" in cfg and cfg["bos_token_id"] is None and tok.bos_token_id is None
    loaded = AutoConfig.from_pretrained(os.path.dirname(config_path))
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (tok.eos_token_id, tok.pad_token_id, None)


def reference_logits(run_dir, subnet):
    """Our megatron model at the budget, from the stage-2 checkpoint in memory (not from any written file)."""
    from pipeline.elastic.slicing import slice_state_dict
    from pipeline.hf.memory import hf_state_from_model, load_hf_state
    from pipeline.training import checkpoint

    m = run_dir["model"]
    full = megatron_model(run_dir["root"], m)
    checkpoint.load(run_dir["ckpt"], [full], load_rng=False)
    small_cfg = subnet.model_config(m)
    small = megatron_model(run_dir["root"], small_cfg)
    load_hf_state(small, small_cfg, slice_state_dict(hf_state_from_model(full, m), m, subnet))
    return megatron_logits(small, run_dir["tokens"])


def tensors_of(hf_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(hf_dir, "model.safetensors"))


def data_bytes(hf_dir):
    """Tensor bytes of a directory's safetensors files; asserts file size = 8 + header + tensor bytes."""
    from pipeline.hf.safetensors_io import read_header

    total = 0
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors"):
            path = os.path.join(hf_dir, name)
            infos, _ = read_header(path)
            nbytes = sum(i.nbytes for i in infos.values())
            assert os.path.getsize(path) == min(i.start for i in infos.values()) + nbytes
            total += nbytes
    return total


def test_elastic_dir_layout_and_full_budget(run_dir):
    from test_slicing import transformers_logits

    e = run_dir["elastic"]
    with open(os.path.join(e, "elastic.json")) as f:
        data = json.load(f)
    assert [b["name"] for b in data["budgets"]] == ["full", "medium", "small", "hetero"]
    assert data["model"]["pattern"] == run_dir["model"].pattern
    assert data["source_checkpoint"] == os.path.abspath(run_dir["ckpt"])
    assert os.path.isfile(os.path.join(e, "megatron", "iter_0000000", "metadata.json"))
    assert open(os.path.join(e, "megatron", "latest_checkpointed_iteration.txt")).read() == "0"
    tok_dir = os.path.join(run_dir["root"], "tiny", "data", "tokenizer")
    assert open(os.path.join(e, "tokenizer.json")).read() == open(os.path.join(tok_dir, "tokenizer.json")).read()
    assert_special_tokens(os.path.join(e, "config.json"), tok_dir)
    assert not os.path.exists(e + ".partial")
    delta = (transformers_logits(e, run_dir["tokens"]) - reference_logits(run_dir, budget_subnet(0))).abs().max()
    print(f"\nelastic dir (full budget) in transformers vs megatron: {delta:.3g}")
    assert delta <= TOL


@pytest.mark.parametrize("name", ["full", "medium", "small"])
def test_sliced_budget_matches_megatron_at_that_budget(run_dir, tmp_path, name):
    from pipeline.cli import run
    from test_slicing import transformers_logits

    subnet = dict((n, s) for n, _, s in BUDGETS)[name]
    out = str(tmp_path / name)
    run(["slice", "--recipe", TINY, "--budget", name, "--out", out, *run_dir["args"]])
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["hidden_size"] == subnet.hidden and cfg["n_routed_experts"] == subnet.experts
    assert cfg["num_hidden_layers"] == run_dir["model"].num_layers - len(subnet.skip_layers)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert_special_tokens(os.path.join(out, "config.json"), os.path.join(run_dir["root"], "tiny", "data", "tokenizer"))
    ref = reference_logits(run_dir, subnet)
    delta = (transformers_logits(out, run_dir["tokens"]) - ref).abs().max().item()
    print(f"\n{name}: sliced HF in transformers vs megatron at the budget: max |d| = {delta:.3g}")
    assert ref.abs().max() > 0.5 and delta <= TOL


def test_nesting_and_storage_report_on_written_files(run_dir, tmp_path):
    from pipeline.cli import run
    from pipeline.elastic.slicing import slice_state_dict

    m, outs = run_dir["model"], {"full": run_dir["elastic"]}
    for name in ("medium", "small"):
        outs[name] = str(tmp_path / name)
        run(["slice", "--recipe", TINY, "--budget", name, "--out", outs[name], *run_dir["args"]])
    # each smaller model is a prefix (heads: per group) of the next larger one, layer numbering aside
    subs = dict((n, s) for n, _, s in BUDGETS)
    pairs = [("full", "medium", subs["medium"]), ("medium", "small", subs["small"])]  # medium skips no layer
    for large, small, relative in pairs:
        base = subs[large].model_config(m)
        again = slice_state_dict(tensors_of(outs[large]), base, relative)
        got = tensors_of(outs[small])
        assert sorted(again) == sorted(got) and all(torch.equal(again[k], got[k]) for k in got), (large, small)
    small, medium = tensors_of(outs["small"]), tensors_of(outs["medium"])
    assert torch.equal(small["backbone.embeddings.weight"], medium["backbone.embeddings.weight"][:, :64])
    assert torch.equal(small["backbone.layers.4.mixer.experts.3.down_proj.weight"],
                       medium["backbone.layers.4.mixer.experts.3.down_proj.weight"][:64, :32])

    with open(os.path.join(run_dir["elastic"], "elastic.json")) as f:
        report = json.load(f)["storage"]
    rows = {r["name"]: r for r in report["budgets"]}
    assert report["elastic_bytes"] == data_bytes(run_dir["elastic"])
    for name, d in outs.items():
        assert rows[name]["bytes"] == data_bytes(d), name
    assert report["separate_bytes"] == sum(r["bytes"] for r in report["budgets"])
    print(f"\ntiny storage: elastic {report['elastic_bytes']} B, separate {report['separate_bytes']} B")


def test_slice_to_megatron_checkpoint(run_dir, tmp_path):
    from pipeline.cli import run
    from pipeline.training import checkpoint

    out = str(tmp_path / "medium_mcore")
    run(["slice", "--recipe", TINY, "--budget", "medium", "--out", out, "--format", "megatron", *run_dir["args"]])
    assert sorted(os.listdir(out)) == ["checkpoints", "config.yaml", "hf"] and not os.path.exists(out + ".partial")
    small_cfg = budget_subnet(1).model_config(run_dir["model"])
    model = megatron_model(run_dir["root"], small_cfg)
    checkpoint.load(checkpoint.resolve(os.path.join(out, "checkpoints")), [model], load_rng=False)
    delta = (megatron_logits(model, run_dir["tokens"]) - reference_logits(run_dir, budget_subnet(1))).abs().max()
    print(f"\nmedium as a megatron checkpoint vs megatron at the budget: {delta:.3g}")
    assert delta <= TOL


def test_plain_export_of_a_stage_without_budgets(run_dir, tmp_path):
    from pipeline.cli import run

    out = str(tmp_path / "plain")
    run(["export", "--recipe", TINY, "--checkpoint", "import", "--out", out, *run_dir["args"]])
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "elastic.json"))


def test_user_mistakes_are_one_line_and_write_nothing(run_dir, tmp_path, cli):
    out = str(tmp_path / "never")
    cases = [
        (["--budget", "tiny_budget"], "no budget 'tiny_budget' (budgets: full, medium, small, hetero)"),
        (["--budget", "hetero"], "budget 'hetero' has per-layer sizes (layers [1])"),
        (["--budget", "full", "--checkpoint", str(tmp_path)], f"{tmp_path}: no elastic.json"),
    ]
    for extra, message in cases:
        proc = cli("slice", "--recipe", TINY, "--out", out, *extra, *run_dir["args"])
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
        assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_storage_report_of_the_nano_recipe(cli):
    """30B / 23B / 12B at the recipe's axes: elements = the parameter counter's totals + the expert-bias
    buffers; one BF16 elastic checkpoint lands at METHOD §5's 58.9 (GiB)."""
    from pipeline.config import load_recipe
    from pipeline.elastic.storage import budgets_from_axes, storage_report

    recipe = load_recipe(NANO, [])
    budgets = budgets_from_axes(recipe)
    assert [(b.subnet.hidden, b.subnet.moe_ffn, b.subnet.shared_expert_ffn) for b in budgets] == [
        (2688, 1856, 3712), (2176, 1664, 3712), (1920, 960, 3712)]
    report = storage_report(recipe.model, budgets)
    bias = recipe.model.pattern.count("E") * recipe.model.num_experts
    for b, row in zip(budgets, report["budgets"]):
        assert row["elements"] == b.subnet.count(recipe.model).total + bias and row["bytes"] == 2 * row["elements"]
    assert abs(report["elastic_bytes"] / 2**30 - 58.9) < 0.1
    proc = cli("slice", "--recipe", NANO, "--storage-report")
    assert proc.returncode == 0, proc.stderr
    print("\n" + proc.stdout)
    assert f"{report['separate_bytes'] / 2**30:.2f} GiB" in proc.stdout
