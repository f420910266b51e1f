"""Max calibration over every budget's subnet: one static input amax per linear serves all nested models.

Each calibration micro-batch runs once per budget (hard masks of its resolved subnet); an input's amax is
the max over all of them, so no nested model saturates where the full one would not. Ranks hold different
layers (PP), shards (TP) and experts (EP): the per-key maxima are gathered over the whole world. The result
(HF input keys -> amax) is ``<qad stage>/quant_scales.json``; FP8 and NVFP4 both derive their scales from it.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

import torch
import torch.distributed as dist

from pipeline.errors import UserError

SCALES_FILE = "quant_scales.json"


def calibration_batches(recipe) -> List[Dict[str, torch.Tensor]]:
    """``qad.calibration_samples`` sequences (every rank runs all of them: a max needs no DP split)."""
    q = recipe.qad
    seq = q.calibration_seq_length or q.training.seq_length
    mbs = q.training.micro_batch_size
    if q.calibration_data == "synthetic":
        from itertools import islice

        from pipeline.training.synthetic import synthetic_batches

        n = -(-q.calibration_samples // mbs)
        batches = synthetic_batches(recipe.model.vocab_size, seq, recipe.run.seed + 17, 10 ** 8, mbs, 0, 1)
        return list(islice(batches, n))
    from data_prep.loading import calibration_batches as blend_batches

    return list(blend_batches(recipe, q.calibration_samples, seq, mbs))


def calibrate(model, fq, masks, budgets, batches, seq_length: int) -> Dict[str, float]:
    """Input amax of every quantised linear over every budget x batch, maxed over all ranks."""
    from pipeline.elastic.evaluate import lm_loss

    with fq.calibration():
        for b in budgets:
            masks.set_subnet(b.subnet)
            for batch in batches:  # one at a time: the last batch may be smaller
                lm_loss(model, [batch], seq_length, batch["tokens"].shape[0])
        masks.clear()
    gathered: List[Dict[str, float]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, fq.local_amax())
    out: Dict[str, float] = {}
    for part in gathered:
        for k, v in part.items():
            out[k] = max(out.get(k, 0.0), v)
    fq.set_amax(out)
    return dict(sorted(out.items()))


def write_scales(stage_dir: str, amax: Dict[str, float], budgets, source: str) -> str:
    path = os.path.join(stage_dir, SCALES_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"input_amax": amax, "budgets": [b.name for b in budgets], "calibrated_on": source}, f, indent=2)
    os.replace(tmp, path)
    return path


def read_scales(path: str) -> Dict[str, float]:
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: run `python -m pipeline qad` first (it calibrates the input scales)")
    try:
        with open(path) as f:
            return {k: float(v) for k, v in json.load(f)["input_amax"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: malformed ({str(e).splitlines()[0]})") from None
