"""Malformed megatron checkpoints, Hugging Face directories and elastic checkpoint directories through the CLI
(in-process): exit 2, one line naming the file, no traceback, nothing written outside the run directory."""

import json
import os
import struct

import pytest

from malformed import expect_user_error, tiny_raw, write_recipe
from conftest import TINY

OVERRIDES = ["model.pattern=ME*-", "model.num_layers=4"]  # the HF tests' tiny model: every layer kind


def _model():
    from pipeline.config import load_recipe

    return load_recipe(TINY, OVERRIDES).model


def _recipe(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["model"].update(pattern="ME*-", num_layers=4)
    return write_recipe(tmp_path, raw)


# ---- megatron checkpoints (export resolves and checks them before megatron loads) -------------------------------
def _iter_dir(root, it=3, metadata=b'{"sharded_backend": "torch_dist"}', marker=None):
    d = root / f"iter_{it:07d}"
    d.mkdir(parents=True)
    if metadata is not None:
        (d / "metadata.json").write_bytes(metadata)
    (root / "latest_checkpointed_iteration.txt").write_bytes(marker if marker is not None else str(it).encode())
    return root


def ckpt_empty_dir(tmp):
    (tmp / "ck").mkdir()
    return tmp / "ck", ["no checkpoint found"]


def ckpt_marker_text(tmp):
    return _iter_dir(tmp / "ck", marker=b"latest"), ["latest_checkpointed_iteration.txt", "expected an iteration"]


def ckpt_marker_binary(tmp):
    return _iter_dir(tmp / "ck", marker=b"\xff\xfe\x00\x01"), ["latest_checkpointed_iteration.txt"]


def ckpt_marker_names_missing_iteration(tmp):
    root = _iter_dir(tmp / "ck")
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    return root, ["names iteration 7", "iter_0000007 is missing"]


def ckpt_metadata_malformed(tmp):
    return _iter_dir(tmp / "ck", metadata=b'{"sharded_backend": '), ["metadata.json:1", "not valid JSON"]


def ckpt_metadata_a_list(tmp):
    return _iter_dir(tmp / "ck", metadata=b"[1]"), ["metadata.json", "must hold a JSON object"]


def ckpt_metadata_not_utf8(tmp):
    return _iter_dir(tmp / "ck", metadata=b'{"sharded_backend": "\xff"}'), ["metadata.json", "not UTF-8"]


def ckpt_metadata_missing(tmp):
    return _iter_dir(tmp / "ck", metadata=None), ["iter_0000003", "metadata.json missing"]


def ckpt_budgets_malformed(tmp):
    stage = tmp / "stage2"
    _iter_dir(stage / "checkpoints")
    (stage / "elastic_budgets.json").write_text('{"budgets": [')
    return stage / "checkpoints", ["elastic_budgets.json:1", "not valid JSON"], stage / "elastic_budgets.json"


CHECKPOINTS = {
    "empty checkpoint dir": ckpt_empty_dir,
    "latest marker is text": ckpt_marker_text,
    "latest marker is binary": ckpt_marker_binary,
    "latest marker names a missing iteration": ckpt_marker_names_missing_iteration,
    "metadata.json malformed": ckpt_metadata_malformed,
    "metadata.json a list": ckpt_metadata_a_list,
    "metadata.json not UTF-8": ckpt_metadata_not_utf8,
    "metadata.json missing": ckpt_metadata_missing,
    "elastic_budgets.json malformed": ckpt_budgets_malformed,
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_malformed_megatron_checkpoint(case, tmp_path, capsys):
    ckpt, expected, *named = CHECKPOINTS[case](tmp_path)  # named: the file at fault, when not the checkpoint
    recipe = _recipe(tmp_path)
    expect_user_error(["export", "--recipe", recipe, "--checkpoint", str(ckpt), "--dry-run"], capsys, tmp_path,
                      str((named or [ckpt])[0]), *expected)


def test_unknown_checkpoint_stage(tmp_path, capsys):
    expect_user_error(["export", "--recipe", _recipe(tmp_path), "--checkpoint", "stage7"], capsys, tmp_path,
                      "--checkpoint stage7", "neither a path nor a stage")


def test_torn_tensor_metadata_stops_the_real_export(tmp_path, capsys):
    root = _iter_dir(tmp_path / "ck")
    (root / "iter_0000003" / ".metadata").write_bytes(os.urandom(64))
    expect_user_error(["export", "--recipe", _recipe(tmp_path), "--checkpoint", str(root), "--out",
                       str(tmp_path / "runs" / "t" / "hf")], capsys, tmp_path, "iter_0000003",
                      "cannot read the checkpoint's tensor metadata")


def test_resume_from_a_torn_checkpoint(tmp_path, capsys):
    """The stage's own latest checkpoint has a garbage common.pt: the resume names it (and the process groups the
    stage set up are shut down, so the next in-process run starts clean)."""
    root = _iter_dir(tmp_path / "runs" / "t" / "pretrain" / "checkpoints")
    (root / "iter_0000003" / "common.pt").write_bytes(os.urandom(256))
    raw = tiny_raw(tmp_path)
    raw["model"].update(pattern="ME*-", num_layers=4)
    raw["training"].update(train_iters=4, seq_length=32, lr_warmup_iters=0)
    raw["logging"]["tensorboard"] = False
    expect_user_error(["pretrain", "--recipe", write_recipe(tmp_path, raw)], capsys, tmp_path,
                      str(root / "iter_0000003"), "cannot read the checkpoint's common state")
    import torch.distributed as dist

    assert not dist.is_initialized()


# ---- Hugging Face directories (import --dry-run checks config.json and every safetensors header) ---------------
def _hf_dir(tmp, config=True, weights=True):
    from safetensors.torch import save_file
    import torch

    from pipeline.hf.config import hf_config_from_model
    from pipeline.hf.mapping import hf_shapes

    d = tmp / "hf"
    d.mkdir()
    m = _model()
    if config:
        (d / "config.json").write_text(json.dumps(hf_config_from_model(m, dtype="float32")))
    if weights:
        save_file({n: torch.zeros(s) for n, s in hf_shapes(m).items()}, str(d / "model.safetensors"))
    return d


def hf_no_config(tmp):
    return _hf_dir(tmp, config=False), ["no config.json"]


def hf_config_malformed(tmp):
    d = _hf_dir(tmp)
    (d / "config.json").write_text('{\n  "model_type": "nemotron_h",\n  "hidden_size": \n}')
    return d, ["config.json:4", "not valid JSON"]


def hf_config_a_list(tmp):
    d = _hf_dir(tmp)
    (d / "config.json").write_text("[]")
    return d, ["config.json", "must hold a JSON object"]


def hf_config_not_utf8(tmp):
    d = _hf_dir(tmp)
    (d / "config.json").write_bytes(b'{"model_type": "\xff"}')
    return d, ["config.json", "not UTF-8"]


def hf_config_other_model(tmp):
    d = _hf_dir(tmp)
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d, ["config.json", "model_type = 'llama'"]


def hf_no_weights(tmp):
    return _hf_dir(tmp, weights=False), ["no model.safetensors.index.json"]


def hf_weights_too_short(tmp):
    d = _hf_dir(tmp, weights=False)
    (d / "model.safetensors").write_bytes(b"abc")
    return d, ["model.safetensors", "shorter than 8 bytes"]


def hf_weights_garbage_header(tmp):
    d = _hf_dir(tmp, weights=False)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 16) + b"not json at all!")
    return d, ["model.safetensors", "unreadable header"]


def hf_weights_header_entry(tmp):
    d = _hf_dir(tmp, weights=False)
    header = json.dumps({"backbone.embeddings.weight": {"shape": [4]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return d, ["model.safetensors", "backbone.embeddings.weight"]


def hf_index_malformed(tmp):
    d = _hf_dir(tmp, weights=False)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {')
    return d, ["model.safetensors.index.json:1", "not valid JSON"]


def hf_index_missing_shard(tmp):
    d = _hf_dir(tmp, weights=False)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    return d, ["model.safetensors.index.json", "model-00001.safetensors, which is missing"]


def hf_index_without_map(tmp):
    d = _hf_dir(tmp, weights=False)
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return d, ["model.safetensors.index.json", "no weight_map"]


HF_DIRS = {
    "no config.json": hf_no_config,
    "config.json malformed": hf_config_malformed,
    "config.json a list": hf_config_a_list,
    "config.json not UTF-8": hf_config_not_utf8,
    "config.json of another model": hf_config_other_model,
    "no weights": hf_no_weights,
    "safetensors shorter than its size field": hf_weights_too_short,
    "safetensors header not JSON": hf_weights_garbage_header,
    "safetensors header entry without dtype": hf_weights_header_entry,
    "index malformed": hf_index_malformed,
    "index names a missing shard": hf_index_missing_shard,
    "index without weight_map": hf_index_without_map,
}


@pytest.mark.parametrize("case", list(HF_DIRS))
def test_malformed_hf_dir(case, tmp_path, capsys):
    hf, expected = HF_DIRS[case](tmp_path)
    expect_user_error(["import", "--recipe", _recipe(tmp_path), "--hf", str(hf), "--dry-run"], capsys, tmp_path,
                      str(hf), *expected)


# ---- elastic checkpoint directories (slice) ----------------------------------------------------------------------
def _elastic_dir(tmp, tokenizer_dir=None):
    from pipeline.elastic.elastic_dir import write_elastic_json
    from pipeline.elastic.subnet import ResolvedBudget, Subnet
    from pipeline.hf.config import hf_config_from_model

    d = tmp / "elastic"
    d.mkdir()
    m = _model()
    write_elastic_json(str(d), m, [ResolvedBudget("full", 1.0, Subnet.full(m))], {})
    (d / "config.json").write_text(json.dumps(hf_config_from_model(m, dtype="float32")))
    return d


def el_no_json(tmp):
    d = _elastic_dir(tmp)
    os.remove(d / "elastic.json")
    return d, ["no elastic.json"]


def el_json_malformed(tmp):
    d = _elastic_dir(tmp)
    (d / "elastic.json").write_text('{"budgets": [}')
    return d, ["elastic.json", "malformed"]


def el_json_without_model(tmp):
    d = _elastic_dir(tmp)
    data = json.loads((d / "elastic.json").read_text())
    del data["model"]
    (d / "elastic.json").write_text(json.dumps(data))
    return d, ["elastic.json", "malformed", "model"]


def el_json_negative_size(tmp):
    d = _elastic_dir(tmp)
    data = json.loads((d / "elastic.json").read_text())
    data["model"]["hidden_size"] = -64
    (d / "elastic.json").write_text(json.dumps(data))
    return d, ["elastic.json", "model.hidden_size = -64"]


def el_unknown_budget(tmp):
    return _elastic_dir(tmp), ["elastic.json", "no budget 'small'", "budgets: full"]


def el_config_malformed(tmp):
    d = _elastic_dir(tmp)
    (d / "config.json").write_text('{"model_type": "nemotron_h",,}')
    return d, ["config.json:1", "not valid JSON"]


def el_tokenizer_malformed(tmp):
    d = _elastic_dir(tmp)
    (d / "tokenizer.json").write_text('{"model": ')
    (d / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    return d, ["cannot load the tokenizer"]


ELASTIC = {
    "no elastic.json": (el_no_json, "full"),
    "elastic.json malformed": (el_json_malformed, "full"),
    "elastic.json without model": (el_json_without_model, "full"),
    "elastic.json with a negative size": (el_json_negative_size, "full"),
    "unknown budget": (el_unknown_budget, "small"),
    "config.json malformed": (el_config_malformed, "full"),
    "tokenizer.json malformed": (el_tokenizer_malformed, "full"),
}


@pytest.mark.parametrize("case", list(ELASTIC))
def test_malformed_elastic_dir(case, tmp_path, capsys):
    make, budget = ELASTIC[case]
    d, expected = make(tmp_path)
    out = tmp_path / "runs" / "t" / "sliced"
    expect_user_error(["slice", "--recipe", _recipe(tmp_path), "--checkpoint", str(d), "--budget", budget,
                       "--out", str(out)], capsys, tmp_path, str(d), *expected)
    assert not out.exists() and not os.path.exists(str(out) + ".partial")
