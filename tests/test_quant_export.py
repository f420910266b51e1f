"""Quantised elastic checkpoints: export, slicing by prefix, and the dequantised slice in transformers (CPU, fp32).

The parent is test_elastic_slice_vs_masked's (every axis elastic, depth by a removal order, 1-D parameters
perturbed), saved as a stage-2 checkpoint and exported as the BF16-layout elastic directory. Input scales are
calibrated over both budgets on random tokens; the directory is then quantised (FP8 and NVFP4, ModelOpt layout).
Per budget:

  (a) slicing the quantised directory gives exactly the tensors of quantising the sliced BF16 model with the
      parent's per-tensor scales (packed E2M1 bytes, E4M3 block scales, FP8 weights, scales), and keeps the
      excluded modules (renumbered) in hf_quant_config.json / config.json;
  (b) the sliced NVFP4 / FP8 model dequantised into transformers' NemotronH (input quantisers from its
      input_scale) gives the logits of the fake-quantised megatron model under that budget's masks:
      max |d| <= 1e-5 in fp32 (measured <= 3.3e-7, with and without activation quantisers), where quantisation
      itself moves the logits by 0.05 (FP8) to 0.2 (NVFP4). Routed experts' routing weight is applied after fc2
      in the fake-quant model (as vLLM and transformers do), so fc2 quantises the same activations.
"""

import json
import os

import pytest
import torch

from test_elastic_slice_vs_masked import BUDGETS, HF_BASE_CONFIG, REMOVAL_ORDER, forward, hard_choice, \
    perturbed_parent, recipe_at

TOL = 1e-5  # measured max 3.3e-7 (fp32)


@pytest.fixture(scope="module")
def quant_family(tmp_path_factory):
    from pipeline import parallel
    from pipeline.elastic.elastic_dir import export_elastic
    from pipeline.elastic.masks import ElasticMasks
    from pipeline.elastic.subnet import BUDGETS_FILE, ResolvedBudget, budgets_to_json
    from pipeline.quant.calib import calibrate
    from pipeline.quant.export import quantize_hf_dir
    from pipeline.quant.modules import FakeQuant
    from pipeline.training import checkpoint

    d = tmp_path_factory.mktemp("quant_export")
    r = recipe_at(str(d / "runs"))
    m = r.model
    parallel.initialize(r)
    parent = perturbed_parent(r)
    stage = d / "runs" / "tiny" / "stage2"
    ckpt = checkpoint.save(str(stage / "checkpoints"), 0, [parent])
    budgets = [ResolvedBudget(name, 1.0 - 0.3 * j, hard_choice(j).argmax_subnet(m, REMOVAL_ORDER))
               for name, (j, _) in BUDGETS.items()]
    with open(stage / BUDGETS_FILE, "w") as f:
        json.dump(budgets_to_json(m, budgets), f)
    bf16 = str(d / "elastic")
    export_elastic(m, ckpt, bf16, budgets, str(stage / BUDGETS_FILE), base_config=HF_BASE_CONFIG, progress=False)
    masks = ElasticMasks(parent, m, r.elastic.axes, REMOVAL_ORDER)
    fq = FakeQuant(parent, m, r.qad)
    gen = torch.Generator().manual_seed(3)
    batches = [{"tokens": t, "position_ids": torch.arange(40).expand(2, 40), "labels": t,
                "loss_mask": torch.ones(2, 40)} for t in torch.randint(0, m.vocab_size, (2, 2, 40), generator=gen)]
    amax = calibrate(parent, fq, masks, budgets, batches, 40)
    dirs = {fmt: quantize_hf_dir(bf16, str(d / f"elastic-{fmt}"), m, fmt, r.qad, amax, progress=False)
            for fmt in ("fp8", "nvfp4")}
    tokens = torch.randint(0, m.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    yield {"r": r, "m": m, "budgets": {b.name: b for b in budgets}, "bf16": bf16, "dirs": dirs, "amax": amax,
           "parent": parent, "masks": masks, "fq": fq, "tokens": tokens}
    parallel.shutdown()


def test_calibration_and_layout(quant_family):
    import dataclasses

    from pipeline.config.schema import DEFAULT_QUANT_EXCLUDE
    from pipeline.hf.safetensors_io import SafetensorsDir
    from pipeline.quant.spec import excluded_linears

    m, r = quant_family["m"], quant_family["r"]
    amax = quant_family["amax"]
    assert "backbone.layers.1.mixer.experts.*.up_proj" in amax and "backbone.layers.3.mixer.k_proj" not in amax
    skipped_by_all = {3, 6}  # both budgets drop layers 3 and 6: never calibrated (a real family has the full budget)
    assert all((v > 0) != (int(k.split(".")[2]) in skipped_by_all) for k, v in amax.items() if k != "lm_head"), amax
    excluded = excluded_linears(m, r.qad)
    assert excluded == ["backbone.layers.1.mixer.gate", "backbone.layers.4.mixer.gate", "backbone.layers.8.mixer.gate",
                        "lm_head"]  # tiny.yaml: attention and every Mamba projection quantised too
    nano = dataclasses.replace(r.qad, exclude=list(DEFAULT_QUANT_EXCLUDE), keep_mamba_before_attention=True)
    assert "backbone.layers.2.mixer.in_proj" in excluded_linears(m, nano)  # the Mamba layer feeding attention 3
    assert "backbone.layers.3.mixer.q_proj" in excluded_linears(m, nano)
    assert "backbone.layers.0.mixer.in_proj" not in excluded_linears(m, nano)
    files = SafetensorsDir(quant_family["dirs"]["nvfp4"]).tensors
    w = files["backbone.layers.0.mixer.in_proj.weight"]
    assert w.dtype == torch.uint8 and files["backbone.layers.0.mixer.in_proj.weight_scale"].dtype == torch.float8_e4m3fn
    assert files["backbone.layers.0.mixer.in_proj.weight_scale"].shape[-1] * 8 == w.shape[-1]
    assert files["backbone.layers.1.mixer.gate.weight"].dtype == torch.float32  # excluded: as exported
    from pipeline.elastic.elastic_dir import element_bytes
    from pipeline.quant.storage import quant_storage_report

    stored = element_bytes(quant_family["bf16"])
    for fmt, d in quant_family["dirs"].items():  # the storage report from shapes == the written tensor bytes
        written = sum(t.nbytes for t in SafetensorsDir(d).tensors.values())
        report = quant_storage_report(m, list(quant_family["budgets"].values()), fmt, r.qad, 4, stored)
        assert report["elastic_bytes"] == written, fmt
    with open(os.path.join(quant_family["dirs"]["nvfp4"], "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4" and "lm_head" in qc["ignore"]


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("name", list(BUDGETS))
def test_sliced_quantized_equals_quantized_slice(quant_family, tmp_path, fmt, name):
    from pipeline.elastic.elastic_dir import slice_to_hf
    from pipeline.hf.safetensors_io import SafetensorsDir
    from pipeline.quant.export import HF_QUANT_CONFIG
    from te_kernels import quant_torch as ref

    m, budget = quant_family["m"], quant_family["budgets"][name]
    sliced_bf16 = SafetensorsDir(slice_to_hf(quant_family["bf16"], str(tmp_path / "bf16"), m, budget, progress=False))
    out = slice_to_hf(quant_family["dirs"][fmt], str(tmp_path / fmt), m, budget, progress=False)
    sliced = SafetensorsDir(out)
    parent = SafetensorsDir(quant_family["dirs"][fmt])
    checked = 0
    for new in sliced.tensors:
        if not new.endswith(".weight_scale") or fmt == "fp8" and sliced.tensors[new].shape != ():
            continue
        module = new[:-len(".weight_scale")]
        w = sliced_bf16.read(module + ".weight")
        got = sliced.read(module + ".weight")
        # the parent's per-tensor scale: the sliced file keeps it (same value), and it is the parent's
        key = "weight_scale" if fmt == "fp8" else "weight_scale_2"
        scale = sliced.read(f"{module}.{key}")
        assert scale.item() in {parent.read(n).item() for n in parent.tensors if n.endswith(key)}
        if fmt == "fp8":
            assert torch.equal(got.view(torch.uint8), ref.fp8_quantize(w, scale).view(torch.uint8)), module
        else:
            codes, blocks = ref.nvfp4_quantize(w, scale)
            assert torch.equal(got, ref.pack_fp4(codes)), module
            assert torch.equal(sliced.read(new).view(torch.uint8), blocks.view(torch.uint8)), module
        checked += 1
    assert checked >= 10
    with open(os.path.join(out, HF_QUANT_CONFIG)) as f:
        excluded = json.load(f)["quantization"]["exclude_modules"]
    layers = {n.split(".")[2] for n in sliced.tensors if n.startswith("backbone.layers.")}
    assert all(not e.startswith("backbone.layers.") or e.split(".")[2] in layers for e in excluded)
    for e in excluded:  # excluded linears are stored unquantised under their renumbered names
        if e + ".weight" in sliced.tensors:
            assert sliced.tensors[e + ".weight"].dtype == torch.float32 and e + ".weight_scale" not in sliced.tensors


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
@pytest.mark.parametrize("name", list(BUDGETS))
def test_dequantized_slice_in_transformers_equals_fake_quant(quant_family, tmp_path, fmt, name):
    from pipeline.elastic.elastic_dir import slice_to_hf
    from pipeline.quant.hf_reader import load_dequantized

    m, budget, tokens = quant_family["m"], quant_family["budgets"][name], quant_family["tokens"]
    masks, fq = quant_family["masks"], quant_family["fq"]
    masks.set_subnet(budget.subnet)
    fq.set_format(fmt)
    fake = forward(quant_family["parent"], tokens)
    fq.set_format(None)
    bf16 = forward(quant_family["parent"], tokens)
    fq.activations = False
    fq.set_format(fmt)
    weights_only = forward(quant_family["parent"], tokens)
    fq.activations = True
    fq.set_format(None)
    masks.clear()
    out = slice_to_hf(quant_family["dirs"][fmt], str(tmp_path / fmt), m, budget, progress=False)
    with torch.no_grad():
        hf = load_dequantized(out)(tokens).logits
        hf_w = load_dequantized(out, activations=False)(tokens).logits
    d, d_w = (hf - fake).abs().max().item(), (hf_w - weights_only).abs().max().item()
    q_effect = (fake - bf16).abs().max().item()
    print(f"\n{fmt} {name}: max |fake-quant megatron - dequantised slice (transformers)| = {d:.3g} "
          f"(weights only: {d_w:.3g}); quantisation moves the logits by {q_effect:.3g}")
    assert q_effect > 1000 * TOL  # the quantiser really acts
    assert d_w <= TOL and d <= TOL
