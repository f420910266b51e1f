"""Recipe checks of each training stage's layout: context parallelism, activation recompute, packed sequences.

Each stage runs with its own ``<stage>.parallelism`` (the top-level block plus the stage's overrides,
``load.for_stage``); every check here names the stage's key. ``validate_stage_layouts`` also re-runs the
general checks (TP/EP divisibility, elastic sizes) for a stage whose layout differs from the top-level one.
"""

from __future__ import annotations

import re

from pipeline.config.schema import TRAIN_STAGES, Recipe
from pipeline.errors import UserError

RECOMPUTE = ("none", "full", "selective")
# megatron's selective-recompute modules that exist in this model, plus ours: mamba (pipeline/model/recompute.py)
RECOMPUTE_MODULES = ("core_attn", "moe", "moe_act", "layernorm", "mlp", "shared_experts", "mamba")


def check_stage_layouts(recipe: Recipe, fail) -> None:
    m = recipe.model
    te = m.backend != "local"  # auto: TE wherever the job runs it (checked again at build time)
    for stage in TRAIN_STAGES:
        p, t = getattr(recipe, stage).parallelism, getattr(recipe, stage).training
        key = f"{stage}.parallelism"
        if p.recompute not in RECOMPUTE:
            fail(f"{key}.recompute = {p.recompute!r}, expected one of {', '.join(RECOMPUTE)}")
        bad = [x for x in p.recompute_modules if x not in RECOMPUTE_MODULES]
        if bad:
            fail(f"{key}.recompute_modules has {bad}, expected some of {', '.join(RECOMPUTE_MODULES)}")
        if p.recompute == "selective" and not p.recompute_modules:
            fail(f"{key}.recompute = selective needs a non-empty recompute_modules")
        if p.recompute == "selective" and "moe_act" in p.recompute_modules and not te:
            fail(f"{key}.recompute_modules: moe_act needs the TE backend (grouped-GEMM experts)")
        if p.cp > 1:
            _check_context_parallel(recipe, stage, p, t, te, fail)
        if t.document_attention_mask:
            if m.backend == "te":
                fail(f"{stage}.training.document_attention_mask needs model.backend: local (the TE path would "
                     "need THD packed sequences, not wired yet)")
            if p.cp > 1:
                fail(f"{stage}.training.document_attention_mask with {key}.cp = {p.cp}: a document mask is not "
                     "split over context-parallel ranks; use cp = 1")


def _check_context_parallel(recipe: Recipe, stage: str, p, t, te: bool, fail) -> None:
    m, key = recipe.model, f"{stage}.parallelism.cp"
    if t.seq_length % (2 * p.cp):
        fail(f"{stage}.training.seq_length = {t.seq_length} must be a multiple of 2 x {key} = {2 * p.cp} "
             "(megatron's load-balanced split: 2 chunks per CP rank)")
    if "*" in m.pattern and m.backend == "local":  # auto resolves where it runs: checked again at build time
        fail(f"{key} = {p.cp} with attention layers needs model.backend: te (megatron's local attention has no "
             "context parallelism)")
    if "M" in m.pattern:  # megatron's Mamba CP hands each CP rank a share of this TP rank's heads and groups
        heads, groups = m.mamba_num_heads // p.tp, m.mamba_num_groups // p.tp
        if heads % p.cp:
            fail(f"{key} = {p.cp} must divide the Mamba heads per TP rank ({m.mamba_num_heads} / tp {p.tp})")
        if (p.cp % groups) if groups < p.cp else (groups % p.cp):
            fail(f"{key} = {p.cp} and the Mamba groups per TP rank ({groups}) must divide one another")


def validate_stage_layouts(recipe: Recipe, source: str) -> None:
    """The general recipe checks again for each stage whose parallelism differs from the top-level one, with
    the failing key named as that stage's (``stage2.parallelism.tp``)."""
    from pipeline.config.load import for_stage
    from pipeline.config.validate import validate

    for stage in TRAIN_STAGES:
        if getattr(recipe, stage).parallelism == recipe.parallelism:
            continue
        try:
            validate(for_stage(recipe, stage), source, stage_layouts=False)
        except UserError as e:
            raise UserError(re.sub(r"(?<![\w.])parallelism\.", f"{stage}.parallelism.", str(e))) from None
