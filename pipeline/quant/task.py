"""QADTask: nested quantisation-aware distillation at the stage-2 subnets.

Per micro-batch (identically on every rank: a pure function of (seed, iteration, micro-batch)):

1. sample a budget (``qad.budget_weights``, default stage 2's);
2. student and teacher take that budget's resolved subnet (``<budgets_from>/elastic_budgets.json``, fixed: no
   router); the student is the elastic model fake-quantised (``modules.FakeQuant``), the teacher the frozen BF16
   elastic model of stage 2;
3. loss = forward KL(teacher || student) at ``elastic.kd_temperature``, as in stage 2.

Before the first step the input amax of every quantised linear is calibrated over every budget's subnet on the
stage-2 weights (``calib.py``) and written to ``quant_scales.json`` (a resumed run reads it back). Pipeline
parallelism: the teacher rides along as in the elastic stages (``[student | teacher]`` activations).
"""

from __future__ import annotations

import os
import shutil
from functools import partial
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.transformer.module import Float16Module

from pipeline.elastic.kd import forward_kl, sample_budget
from pipeline.elastic.masks import ElasticMasks
from pipeline.elastic.masks.spec import build_elastic_model
from pipeline.elastic.router_slot import SLOT
from pipeline.elastic.subnet import BUDGETS_FILE
from pipeline.elastic.task import model_precision_output
from pipeline.elastic.teacher import double_hidden_shapes, freeze_expert_bias, split_stage_input, teacher_source
from pipeline.errors import UserError
from pipeline.quant import calib
from pipeline.quant.modules import FakeQuant, local_backend
from pipeline.training import checkpoint
from pipeline.training.task import Task, check_document_mask, context_parallel_shard, mean_logs, token_mean


def budgets_path(recipe) -> str:
    from pipeline.training.loop import stage_dir

    return os.path.join(stage_dir(recipe, recipe.qad.budgets_from), BUDGETS_FILE)


def read_qad_budgets(recipe):
    from pipeline.elastic.elastic_dir import read_budgets

    path = budgets_path(recipe)
    if not os.path.isfile(path):
        raise UserError(f"qad.budgets_from = {recipe.qad.budgets_from!r}: {path} is missing (run stage2 to its end)")
    return read_budgets(path, recipe.model)


def build_quant_model(recipe, dtype: torch.dtype, trainable: bool = False) -> torch.nn.Module:
    """The elastic model with megatron's own linears (``local_backend``): what the fake-quant hooks reach."""
    return build_elastic_model(local_backend(recipe), dtype, trainable=trainable)


def frozen_elastic(recipe, ckpt: str, bf16: bool) -> torch.nn.Module:
    """The BF16 elastic teacher (stage 2's weights, no router), frozen, this rank's pipeline stage."""
    model = build_quant_model(recipe, torch.bfloat16 if bf16 else torch.float32)
    checkpoint.load(ckpt, [model], load_rng=False, missing_ok=(SLOT,))
    freeze_expert_bias(model)
    model.requires_grad_(False)
    model.eval()
    return Float16Module(model.config, model) if bf16 else model


class QADTask(Task):
    name = "qad"
    init_missing_ok = (SLOT,)  # stage 2's router is not part of the quantised model
    teacher_forward = True

    def __init__(self, recipe, stage: str = "qad", budgets=None):
        """``budgets``: the resolved budgets (default: read from ``qad.budgets_from``; benchmarks pass their own)."""
        super().__init__(recipe, stage)
        self.q = recipe.qad
        self.budgets = budgets or read_qad_budgets(recipe)
        self.weights = list(self.q.budget_weights or recipe.stage2.budget_weights) or [1.0] * len(self.budgets)
        if len(self.weights) != len(self.budgets):
            raise UserError(f"qad: {len(self.weights)} budget weights for the {len(self.budgets)} budgets of "
                            f"{budgets_path(recipe)}")
        self.iteration, self.micro = 0, 0

    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:
        check_document_mask(local_backend(self.recipe), self.stage)
        model = build_quant_model(self.recipe, dtype, trainable=True)
        freeze_expert_bias(model)
        return model

    def setup(self, model_chunks, device) -> None:
        from pipeline.training.loop import stage_dir

        src = teacher_source(self.recipe, "qad.teacher", self.q.teacher)
        bf16 = next(model_chunks[0].parameters()).dtype == torch.bfloat16
        self.attach(model_chunks[0], frozen_elastic(self.recipe, src, bf16))
        path = os.path.join(stage_dir(self.recipe, self.stage), calib.SCALES_FILE)
        if os.path.isfile(path):  # a resumed run keeps the scales it trained with
            self.fq.set_amax(calib.read_scales(path))
        else:  # the student holds the stage-2 weights (training.init_from) before its first step
            batches = calib.calibration_batches(self.recipe)
            seq = batches[0]["tokens"].shape[1]
            amax = calib.calibrate(self.student, self.fq, self.masks, self.budgets, batches, seq)
            if dist.get_rank() == 0:
                calib.write_scales(stage_dir(self.recipe, self.stage), amax, self.budgets, src)
            dist.barrier()
        self.fq.set_format(self.q.format)
        self.teacher_src = src

    def attach(self, student, teacher) -> None:
        """Masks on both models, the fake quantiser on the student (format off until ``fq.set_format``)."""
        self.student, self.teacher = student, teacher
        axes, m = self.recipe.elastic.axes, self.recipe.model
        self.masks = ElasticMasks(student, m, axes)  # subnets name their skipped layers
        self.teacher_masks = ElasticMasks(teacher, m, axes)
        self.fq = FakeQuant(student, m, self.q)

    def schedule_kwargs(self):
        if ps.get_pipeline_model_parallel_world_size() > 1:
            return {"adjust_tensor_shapes_fn": double_hidden_shapes}
        return {}

    def begin_step(self, iteration: int) -> None:
        self.iteration, self.micro = iteration, 0

    def forward_step(self, data_iterator, model):
        b = sample_budget(self.recipe.run.seed, self.iteration, self.micro, self.weights)
        self.micro += 1
        subnet = self.budgets[b].subnet
        self.masks.set_subnet(subnet)
        self.teacher_masks.set_subnet(subnet)
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
        return s_out, partial(self._loss, t_out, batch["loss_mask"], b)

    def _loss(self, teacher_logits, loss_mask, b: int, student_logits):
        name = self.budgets[b].name
        per_token = forward_kl(student_logits, teacher_logits, loss_mask, self.recipe.elastic.kd_temperature,
                               chunk_tokens=self.q.training.kd_chunk_tokens)
        kd, value = token_mean(per_token, loss_mask)
        return kd, {"loss": value.detach(), f"kd/{name}": value.detach()}

    def reduce_logs(self, loss_dicts: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        return mean_logs(loss_dicts)  # each key over the micro-batches that report it

    def log_extra(self, values: Dict[str, float]) -> str:
        return " | ".join(f"{b.name}: kd {values[f'kd/{b.name}']:.4f}" for b in self.budgets
                          if f"kd/{b.name}" in values) + f" | {self.q.format}"

    def state_dict(self):
        return {"last_step": self.iteration}

    def finish(self, stage_dir: str) -> None:
        """The stage dir holds the subnets it trained (export reads ``elastic_budgets.json`` beside checkpoints)."""
        self.masks.clear()
        if dist.get_rank() == 0:
            shutil.copy2(budgets_path(self.recipe), os.path.join(stage_dir, BUDGETS_FILE))
