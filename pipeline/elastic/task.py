"""The elastic stages' Task: one micro-batch = one sampled budget, router choice, nested masks, KD + budget loss.

Per micro-batch (identically on every rank: the budget and the Gumbel noise are pure functions of
(run.seed, iteration, micro-batch), so TP/EP/PP/DP peers mask the same subnet; the noise is drawn on the model's
device from a generator seeded per micro-batch, and all micro-batches' choices are drawn at ``begin_step`` with ONE
host copy of what must be a host number, so no micro-batch waits for the device):

1. sample the budget (``stageN.budget_weights``, uniform when empty);
2. the router maps it to a choice per axis (Gumbel-softmax at tau(step), logits x the ramped scaler);
3. the student's masks follow the choice (hard: argmax, straight-through max(p); soft: mixture of prefixes);
4. the frozen teacher (the permuted parent) and the student run the same micro-batch;
5. loss = forward KL(teacher || student) + elastic.budget_loss_alpha x budget loss.

Router gradients: its copy on every rank sees only that rank's heads, channels, sequence shard and layers,
so ``router_slot.sync_grads`` sums them over TP and PP; it runs after DDP's data-parallel reduction (in
``finalize_model_grads``, like megatron's own sequence-parallel norm sums), so DDP overlaps its reduction with
the backward (``sync_after_ddp`` names the one layout where it cannot). The budget loss is replicated
on every TP and CP rank, hence scaled by 1 / (tp x cp) so the sums count it once.

The student's MoE expert bias is frozen: masked experts see no tokens and would otherwise drift the full
model's routing away from the teacher's.
"""

from __future__ import annotations

import json
import os
from functools import partial
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.utils import unwrap_model

from pipeline.elastic.budget import budget_loss, target_size
from pipeline.elastic.kd import forward_kl, sample_budget
from pipeline.elastic.masks import ElasticMasks
from pipeline.elastic.masks.recompute import RecomputeMasks, reapply_on_backward
from pipeline.elastic.masks.spec import build_elastic_model
from pipeline.elastic.router import ElasticRouter, fetch_to_host, logit_scale_at, tau_at
from pipeline.elastic.router_slot import SLOT, attach, sync_grads
from pipeline.elastic.subnet import BUDGETS_FILE, ResolvedBudget, budgets_to_json
from pipeline.elastic.teacher import (build_teacher, double_hidden_shapes, freeze_expert_bias, split_stage_input,
                                      teacher_fp8, teacher_source)
from pipeline.errors import UserError
from pipeline.model.params import Dims
from pipeline.training.task import Task, check_document_mask, context_parallel_shard, mean_logs, token_mean

AXIS_TAGS = {"hidden": "h", "attention_heads": "attn", "mamba_heads": "mamba", "ffn": "ffn", "moe_ffn": "moe_ffn",
             "shared_expert_ffn": "shared", "experts": "experts", "depth": "layers"}


def removal_order(recipe) -> List[int]:
    """The importance stage's layer ranking (``importance.json`` "depth"), needed by a depth axis."""
    path = os.path.join(recipe.run.root, recipe.run.name, "importance", "importance.json")
    if not os.path.isfile(path):
        raise UserError(f"elastic.axes.depth needs the importance stage's layer ranking: {path} is missing "
                        f"(run importance with importance.depth: true)")
    from pipeline.hf.files import read_json

    depth = read_json(path, "importance report").get("depth")
    order = depth.get("removal_order") if isinstance(depth, dict) else None
    if not order:
        raise UserError(f"{path} has no depth.removal_order: rerun importance with importance.depth: true")
    return [int(i) for i in order]


def model_precision_output(model) -> Dict:
    """Keyword arguments that keep a bf16 model's logits in bf16 (megatron's Float16Module upcasts them to a full
    fp32 [tokens x vocab/tp] copy by default); the chunked KD upcasts one chunk at a time."""
    from megatron.core.transformer.module import Float16Module

    inner = getattr(model, "module", None)
    return {"fp32_output": False} if isinstance(model, Float16Module) or isinstance(inner, Float16Module) else {}


def _noise_seed(seed: int, iteration: int, micro: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(iteration), int(micro), 7]).generate_state(1)[0])


class ElasticTask(Task):
    name = "elastic"
    init_missing_ok = (SLOT,)  # the importance checkpoint has no router yet
    teacher_forward = True

    def __init__(self, recipe, stage: str):
        super().__init__(recipe, stage)
        self.cfg = getattr(recipe, stage)
        e = recipe.elastic
        self.budgets = e.budgets
        self.weights = list(self.cfg.budget_weights) or [1.0] * len(e.budgets)
        self.hard = self.cfg.masks == "hard"
        self.order = removal_order(recipe) if len(e.axes.depth) > 1 else []
        self.total_steps = self.cfg.training.train_iters
        self.full_size = float(target_size(Dims.from_model(recipe.model), recipe.model, e))  # what fractions are of
        self.iteration, self.micro = 0, 0

    # ---- model and optimizer
    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:
        check_document_mask(self.recipe, self.stage)
        model = build_elastic_model(self.recipe, dtype, fp8=self.cfg.training.fp8, trainable=True)
        freeze_expert_bias(model)
        self.slot = attach(model, ElasticRouter(self.recipe.elastic, self.recipe.model), self.recipe.run.seed)
        return model

    def optimizer_overrides(self):
        from megatron.core.optimizer.optimizer_config import ParamKey

        t, mult = self.cfg.training, self.recipe.elastic.router_lr_mult
        return {ParamKey(name=f"*{SLOT}*"): {"max_lr": t.lr * mult, "min_lr": t.min_lr * mult}}

    def setup(self, model_chunks, device) -> None:
        src = teacher_source(self.recipe, f"{self.stage}.teacher", self.cfg.teacher)
        bf16 = next(model_chunks[0].parameters()).dtype == torch.bfloat16
        self.attach(model_chunks, build_teacher(self.recipe, src, bf16, teacher_fp8(self.cfg)), device)
        self.teacher_src = src

    def attach(self, model_chunks, teacher: torch.nn.Module, device) -> None:
        """Wire the wrapped student chunks and a frozen teacher (``setup`` loads it from the checkpoint; the
        throughput bench passes a random one)."""
        self.teacher = teacher
        self.student = model_chunks[0]
        # under activation recompute the masks are leaves re-applied in the recomputed forward (masks/recompute.py)
        self.recompute = self.recipe.parallelism.recompute != "none"
        masks_cls = RecomputeMasks if self.recompute else ElasticMasks
        self.masks = masks_cls(self.student, self.recipe.model, self.recipe.elastic.axes, self.order)
        config = unwrap_model(self.student).config
        finalize = config.finalize_model_grads_func

        def finalize_with_router(*args, **kwargs):
            if self.recompute:  # the mask leaves' gradients into the router (masks/recompute.py)
                self.masks.push_router_grads()
            if not self.sync_after_ddp():  # PP x distributed optimizer: before DDP's (non-overlapped) reduce-scatter
                sync_grads(self.slot)
                return finalize(*args, **kwargs)
            out = finalize(*args, **kwargs)  # DDP's reduction (overlapped with the backward) is complete here
            sync_grads(self.slot)
            return out

        config.finalize_model_grads_func = finalize_with_router
        self.device = device

    def sync_after_ddp(self) -> bool:
        """Sum the router's gradients over TP / PP after DDP's data-parallel reduction (linear, so the order does
        not change the sum), as megatron sums its sequence-parallel norm grads: that lets DDP overlap its reduction
        with the backward. Not under PP with the distributed optimizer: each stage's reduce-scatter leaves a
        different slice of the router's gradient valid, so there the sum must come first (no overlap)."""
        p = self.recipe.parallelism
        return p.pp == 1 or not p.distributed_optimizer

    def overlap_grad_reduce_ok(self) -> bool:
        # under recompute the router's parameters get a second gradient after the backward (push_router_grads),
        # which DDP's overlapped per-parameter readiness would count twice
        return self.sync_after_ddp() and self.recipe.parallelism.recompute == "none"

    def schedule_kwargs(self):
        if ps.get_pipeline_model_parallel_world_size() > 1:
            return {"adjust_tensor_shapes_fn": double_hidden_shapes}
        return {}

    # ---- one step
    def begin_step(self, iteration: int) -> None:
        """Draw this step's budgets and router choices (with their autograd graphs) for every micro-batch, and
        bring their host numbers over in one transfer: the router's parameters do not change within a step."""
        self.iteration, self.micro = iteration, 0
        self._gather_router_params()
        self.drawn = [self._draw(mb) for mb in range(self.num_microbatches)]
        fetch_to_host([a for _, choice in self.drawn for a in choice.axes.values()])

    def _gather_router_params(self) -> None:
        """With the distributed optimizer's overlapped parameter all-gather, megatron DDP refreshes a module's
        parameters in that module's forward pre-hook; the router reads its linears' weights directly (fp32 MLP),
        so wait for its buckets' all-gather here, as the hook would."""
        ddp = getattr(self, "student", None)
        groups = getattr(ddp, "param_to_bucket_group", None)
        if not getattr(ddp, "use_forward_hook", False) or not groups:
            return
        skip_dispatch = ddp.ddp_config.align_param_gather or ddp.overlap_param_gather_with_optimizer_step
        for group in {id(groups[p]): groups[p] for p in self.slot.parameters() if p in groups}.values():
            group.finish_param_sync(skip_next_bucket_dispatch=skip_dispatch)

    def router_device(self) -> torch.device:
        return next(self.slot.parameters()).device

    def _draw(self, mb: int):
        seed, it = self.recipe.run.seed, self.iteration
        b = sample_budget(seed, it, mb, self.weights)
        tau, scale = self.schedule()
        # Gumbel noise from a generator on the router's device (no host copy), seeded per micro-batch
        generator = torch.Generator(device=self.router_device()).manual_seed(_noise_seed(seed, it, mb))
        return b, self.slot(b, tau, scale, self.hard, generator)

    def schedule(self):
        e = self.recipe.elastic
        return tau_at(self.iteration, e), logit_scale_at(self.iteration, self.total_steps, e)

    def forward_step(self, data_iterator, model):
        mb = self.micro
        self.micro += 1
        # drawn at begin_step; a schedule running more micro-batches than announced draws the rest here
        if mb < len(self.drawn):
            (b, choice), self.drawn[mb] = self.drawn[mb], None  # its graph is the loss's from here on
        else:
            b, choice = self._draw(mb)
        if self.recompute:  # the masks from a second, identical draw (its graph feeds push_router_grads)
            twin = self._draw(mb)[1]
            for axis, a in twin.axes.items():  # same values: reuse the step's host copy
                a.host_probs, a.host_argmax = choice.axes[axis].host_probs, choice.axes[axis].host_argmax
            self.masks.set_choice(twin)
        else:
            self.masks.set_choice(choice)

        batch = context_parallel_shard(next(data_iterator))  # student and teacher see the same shard
        device = next(model.parameters()).device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        split_stage_input(model, self.teacher)
        with torch.no_grad():
            t_out = self.teacher(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                                 **model_precision_output(self.teacher))
        s_out = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), **model_precision_output(model))
        if self.recompute:
            s_out = reapply_on_backward(s_out, self.masks)
        if not ps.is_pipeline_last_stage():
            return torch.cat([s_out, t_out.to(s_out.dtype)], dim=-1), None
        return s_out, partial(self._loss, t_out, batch["loss_mask"], b, choice)

    def _loss(self, teacher_logits, loss_mask, b: int, choice, student_logits):
        e, budget = self.recipe.elastic, self.budgets[b]
        per_token = forward_kl(student_logits, teacher_logits, loss_mask, e.kd_temperature,
                               chunk_tokens=self.cfg.training.kd_chunk_tokens)
        kd, kd_value = token_mean(per_token, loss_mask)
        replicas = ps.get_tensor_model_parallel_world_size() * ps.get_context_parallel_world_size()
        bl, expected = budget_loss(choice, self.recipe.model, budget.fraction, e, self.order)
        bl = bl.to(kd.device)
        loss = kd + e.budget_loss_alpha * bl / replicas  # replicated on TP and CP ranks: counted once
        logs = {"loss": (kd_value + e.budget_loss_alpha * bl.detach()).detach(), f"kd/{budget.name}": kd_value,
                f"budget_loss/{budget.name}": bl.detach(), f"size/{budget.name}": (expected / self.full_size)}
        for axis, size in choice.sizes().items():  # host numbers (the step's one fetch): CPU tensors
            logs[f"choice/{budget.name}/{axis}"] = torch.tensor(float(np.mean(size)))
        return loss, logs

    # ---- logs
    def reduce_logs(self, loss_dicts: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Each key's mean over the micro-batches that trained its budget ("loss": all of them)."""
        return mean_logs(loss_dicts)

    def log_extra(self, values: Dict[str, float]) -> str:
        tau, _ = self.schedule()
        parts = []
        for budget in self.budgets:
            if f"kd/{budget.name}" not in values:
                continue
            n = budget.name
            chosen = " ".join(f"{AXIS_TAGS[a.split('/')[-1]]} {values[a]:g}" for a in sorted(values)
                              if a.startswith(f"choice/{n}/"))
            parts.append(f"{n}: kd {values[f'kd/{n}']:.4f} size {values[f'size/{n}']:.3f}/{budget.fraction:g} "
                         f"bl {values[f'budget_loss/{n}']:.3f} [{chosen}]")
        return " | ".join(parts + [f"tau {tau:.3f}"])

    # ---- periodic validation (training.eval_interval)
    def evaluate(self, model_chunks) -> Dict[str, float]:
        """Validation LM loss of every budget at its current subnet (the router's noise-free argmax, as export
        will slice it), under exact hard masks; keys ``val_loss/<budget>``."""
        from pipeline.elastic.evaluate import lm_loss, validation_batches

        t = self.cfg.training
        if not hasattr(self, "_val_batches"):
            self._val_batches = validation_batches(self.recipe, self.stage, t.micro_batch_size)
        out = {}
        for model in model_chunks:
            model.eval()
        for b in self.resolved_budgets():
            self.masks.set_subnet(b.subnet)
            out[f"val_loss/{b.name}"] = lm_loss(self.student, self._val_batches, t.seq_length, t.micro_batch_size)
        self.masks.clear()
        for model in model_chunks:
            model.train()
        return out

    # ---- state and output
    def state_dict(self):
        """For inspection: tau and the logit scale are functions of the (checkpointed) iteration, so a
        resumed run continues their schedules exactly without reading these back."""
        tau, scale = self.schedule()
        return {"last_step": self.iteration, "tau": tau, "logit_scale": scale}

    def resolved_budgets(self) -> List[ResolvedBudget]:
        """Each budget's router argmax (no noise), as the subnet slicing will cut."""
        tau, scale = self.schedule()
        with torch.no_grad():
            return [ResolvedBudget(b.name, b.fraction,
                                   self.slot(i, tau, scale, True).argmax_subnet(self.recipe.model, self.order))
                    for i, b in enumerate(self.budgets)]

    def finish(self, stage_dir: str) -> None:
        resolved = self.resolved_budgets()
        self.masks.clear()
        if dist.get_rank() != 0:
            return
        data = budgets_to_json(self.recipe.model, resolved)
        data.update(stage=self.stage, teacher=self.teacher_src, removal_order=self.order)
        tmp = os.path.join(stage_dir, BUDGETS_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, os.path.join(stage_dir, BUDGETS_FILE))
        for row in data["budgets"]:
            s = row["subnet"]
            print(f"[{self.stage}] budget {row['name']}: active {row['active_params']:,} "
                  f"({row['active_fraction']:.3f} of the parent, target {row['fraction']:g}) | "
                  + " ".join(f"{AXIS_TAGS[a]} {s[a]}" for a in AXIS_TAGS if a in s)
                  + (f" skip {s['skip_layers']}" if s["skip_layers"] else ""), flush=True)
