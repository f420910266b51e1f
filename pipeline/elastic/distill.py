"""DistillTask: prune + distil ONE fixed smaller model, the sequential-compression baseline of docs/quality.md.

The student is the permuted parent (``distill.training.init_from``, default the importance stage) with the hard
masks of one budget's resolved subnet (``<distill.budgets_from>/elastic_budgets.json``: the subnet the elastic
router chose, so both arms compare the same architecture); there is no router and no budget loss. The teacher is
the frozen, unmasked parent. Per micro-batch: loss = forward KL(parent || subnet) at ``elastic.kd_temperature``.

Hard masks compute exactly the sliced model (tests/test_elastic_slice_vs_masked.py) and the masked-out weights get
zero gradients (AdamW with weight decay 0 leaves them unchanged), so this trains the pruned model itself while
keeping the elastic checkpoint layout that ``evaluate``, ``export`` and ``slice`` read.
"""

from __future__ import annotations

import os
import shutil
from functools import partial
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps

from pipeline.elastic.kd import forward_kl
from pipeline.elastic.masks import ElasticMasks
from pipeline.elastic.masks.spec import build_elastic_model
from pipeline.elastic.subnet import BUDGETS_FILE
from pipeline.elastic.task import model_precision_output
from pipeline.elastic.teacher import (build_teacher, double_hidden_shapes, freeze_expert_bias, split_stage_input,
                                      teacher_fp8, teacher_source)
from pipeline.errors import UserError
from pipeline.training.task import Task, check_document_mask, context_parallel_shard, mean_logs, token_mean


def budgets_path(recipe) -> str:
    """``distill.budgets_from``: a stage of this run, a stage directory, or an elastic_budgets.json file."""
    from pipeline.training.loop import stage_dir

    src = recipe.distill.budgets_from
    if os.path.isfile(src):
        return src
    if os.path.isdir(src):
        return os.path.join(src, BUDGETS_FILE)
    return os.path.join(stage_dir(recipe, src), BUDGETS_FILE)


def read_distill_budget(recipe):
    """(every resolved budget of the file, the index of ``distill.budget``): one clear line when either is wrong."""
    from pipeline.elastic.elastic_dir import read_budgets

    path = budgets_path(recipe)
    if not os.path.isfile(path):
        raise UserError(f"distill.budgets_from = {recipe.distill.budgets_from!r}: {path} is missing "
                        "(run stage2 to its end first)")
    budgets = read_budgets(path, recipe.model)
    names = [b.name for b in budgets]
    if recipe.distill.budget not in names:
        raise UserError(f"distill.budget = {recipe.distill.budget!r}: expected one of {', '.join(names)} ({path})")
    return budgets, names.index(recipe.distill.budget)


class DistillTask(Task):
    name = "distill"
    teacher_forward = True

    def __init__(self, recipe, stage: str = "distill"):
        super().__init__(recipe, stage)
        self.cfg = recipe.distill
        self.budgets, self.index = read_distill_budget(recipe)
        self.subnet = self.budgets[self.index].subnet
        self.iteration = 0

    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:
        check_document_mask(self.recipe, self.stage)
        model = build_elastic_model(self.recipe, dtype, fp8=self.cfg.training.fp8, trainable=True)
        freeze_expert_bias(model)
        return model

    def setup(self, model_chunks, device) -> None:
        src = teacher_source(self.recipe, "distill.teacher", self.cfg.teacher)
        bf16 = next(model_chunks[0].parameters()).dtype == torch.bfloat16
        self.teacher = build_teacher(self.recipe, src, bf16, teacher_fp8(self.cfg))
        self.masks = ElasticMasks(model_chunks[0], self.recipe.model, self.recipe.elastic.axes)
        self.masks.set_subnet(self.subnet)  # fixed for the whole run

    def schedule_kwargs(self):
        if ps.get_pipeline_model_parallel_world_size() > 1:
            return {"adjust_tensor_shapes_fn": double_hidden_shapes}
        return {}

    def begin_step(self, iteration: int) -> None:
        self.iteration = iteration

    def forward_step(self, data_iterator, model):
        batch = context_parallel_shard(next(data_iterator))  # student and teacher see the same shard
        device = next(model.parameters()).device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        split_stage_input(model, self.teacher)
        mask = batch.get("attention_mask")
        with torch.no_grad():
            t_out = self.teacher(batch["tokens"], batch["position_ids"], mask, **model_precision_output(self.teacher))
        s_out = model(batch["tokens"], batch["position_ids"], mask, **model_precision_output(model))
        if not ps.is_pipeline_last_stage():
            return torch.cat([s_out, t_out.to(s_out.dtype)], dim=-1), None
        return s_out, partial(self._loss, t_out, batch["loss_mask"])

    def _loss(self, teacher_logits, loss_mask, student_logits):
        per_token = forward_kl(student_logits, teacher_logits, loss_mask, self.recipe.elastic.kd_temperature,
                               chunk_tokens=self.cfg.training.kd_chunk_tokens)
        kd, value = token_mean(per_token, loss_mask)
        return kd, {"loss": value.detach()}

    def reduce_logs(self, loss_dicts: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        return mean_logs(loss_dicts)

    def log_extra(self, values: Dict[str, float]) -> str:
        return f"{self.budgets[self.index].name} subnet, KD from the parent"

    def state_dict(self):
        return {"last_step": self.iteration}

    def finish(self, stage_dir: str) -> None:
        """The stage dir holds the subnets (as QAD's): ``evaluate --trained distill`` and ``export`` read them."""
        self.masks.clear()
        if dist.get_rank() == 0:
            shutil.copy2(budgets_path(self.recipe), os.path.join(stage_dir, BUDGETS_FILE))
