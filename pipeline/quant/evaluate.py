"""Validation loss per nested budget: BF16 (stage 2) vs FP8 PTQ vs NVFP4 PTQ vs NVFP4 QAD.

All rows use the same subnet per budget, the same validation micro-batches and the same calibrated input
scales (``qad/quant_scales.json``); PTQ rows are the stage-2 weights fake-quantised, the QAD row the qad
stage's weights. The fake quantiser computes exactly what the exported checkpoint dequantises to
(tests/test_quant_export.py), so no export is needed to score it.
"""

from __future__ import annotations

from typing import Dict

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.module import Float16Module

from pipeline.elastic.evaluate import lm_loss, validation_batches
from pipeline.elastic.masks import ElasticMasks
from pipeline.elastic.router_slot import SLOT
from pipeline.quant.modules import FakeQuant
from pipeline.quant.task import build_quant_model
from pipeline.training import checkpoint

ROWS = (("bf16", "stage2", None), ("fp8_ptq", "stage2", "fp8"), ("nvfp4_ptq", "stage2", "nvfp4"),
        ("nvfp4_qad", "qad", "nvfp4"))


def evaluate_quant(recipe, budgets, ckpts: Dict[str, str], amax: Dict[str, float], dtype: torch.dtype,
                   say=print) -> Dict:
    """{"budgets": [{name, fraction, bf16, fp8_ptq, nvfp4_ptq, nvfp4_qad, gap_closed}], ...}; ``ckpts``: stage2 /
    qad checkpoint dirs (the loss on the last pipeline stage)."""
    t = recipe.qad.training
    batches = validation_batches(recipe, "qad", t.micro_batch_size)
    model = build_quant_model(recipe, dtype)
    if dtype == torch.bfloat16:
        model = Float16Module(model.config, model)
    masks = ElasticMasks(model, recipe.model, recipe.elastic.axes)
    fq = FakeQuant(model, recipe.model, recipe.qad)
    fq.set_amax(amax)
    rows = {b.name: {"name": b.name, "fraction": b.fraction} for b in budgets}
    loaded = None
    for label, source, fmt in ROWS:
        if loaded != source:
            checkpoint.load(ckpts[source], [model], load_rng=False, missing_ok=(SLOT,))
            model.eval()
            loaded = source
        fq.set_format(fmt)
        for b in budgets:
            masks.set_subnet(b.subnet)
            rows[b.name][label] = lm_loss(model, batches, t.seq_length, t.micro_batch_size)
            say(f"{label} {b.name}: {rows[b.name][label]:.4f}")
    masks.clear()
    fq.set_format(None)
    for r in rows.values():
        gap = r["nvfp4_ptq"] - r["bf16"]
        r["fp8_vs_bf16"] = r["fp8_ptq"] / r["bf16"] - 1.0
        r["gap_closed"] = (r["nvfp4_ptq"] - r["nvfp4_qad"]) / gap if gap > 0 else float("nan")
    return {"tokens": len(batches) * t.micro_batch_size * t.seq_length * ps.get_data_parallel_world_size(),
            "checkpoints": ckpts, "budgets": list(rows.values())}


def format_table(result: Dict) -> str:
    lines = [f"validation LM loss ({result['tokens']:,} tokens), quantised nested models:",
             f"{'budget':<10} {'bf16':>8} {'fp8 ptq':>8} {'(vs bf16)':>9} {'nvfp4 ptq':>10} {'nvfp4 qad':>10} "
             f"{'gap closed':>10}"]
    for r in result["budgets"]:
        lines.append(f"{r['name']:<10} {r['bf16']:>8.4f} {r['fp8_ptq']:>8.4f} {100 * r['fp8_vs_bf16']:>+8.2f}% "
                     f"{r['nvfp4_ptq']:>10.4f} {r['nvfp4_qad']:>10.4f} {100 * r['gap_closed']:>9.0f}%")
    lines.append("bf16: stage 2 at each budget's subnet; ptq: the same weights fake-quantised with the scales "
                 "calibrated over every budget; qad: after nested NVFP4 QAD; gap closed: (ptq - qad) / (ptq - bf16)")
    return "\n".join(lines)
