"""The training loop shared by pretrain, the elastic stages and QAD.

megatron-core does the work: pipeline schedules (``get_forward_backward_func``), DDP, the optimizer and
its LR schedule, dist checkpointing. This file orders them: resume -> steps -> log -> save, and turns
SIGTERM (SLURM preemption) into "save, then exit 0" on all ranks together.
"""

from __future__ import annotations

import json
import os
import signal
import time

import torch
import torch.distributed as dist
import yaml

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from pipeline import parallel
from pipeline.config.load import recipe_to_dict
from pipeline.config.schema import Recipe
from pipeline.errors import UserError
from pipeline.model.build import mamba_kernels
from pipeline.model.spec import use_te as recipe_uses_te
from pipeline.training import checkpoint, metrics
from pipeline.training.finite import check_finite
from pipeline.training.optim import build_optimizer, hook_model_config, sync_params, wrap_ddp
from pipeline.training.task import Task


def stage_dir(recipe: Recipe, stage: str) -> str:
    return os.path.join(recipe.run.root, recipe.run.name, stage)


def resolve_init(recipe: Recipe, init_from: str) -> str:
    """``init_from`` is another stage's name (its latest checkpoint) or a checkpoint path."""
    if os.path.exists(init_from):
        return checkpoint.resolve(init_from)
    d = os.path.join(stage_dir(recipe, init_from), "checkpoints")
    if not os.path.isdir(d):
        raise UserError(f"training.init_from = {init_from!r}: neither a path nor a finished stage ({d} missing)")
    return checkpoint.resolve(d)


class Trainer:
    def __init__(self, recipe: Recipe, stage: str, task: Task):
        self.recipe, self.stage, self.task = recipe, stage, task
        self.t = getattr(recipe, stage).training
        self.dir = stage_dir(recipe, stage)
        self.ckpt_root = os.path.join(self.dir, "checkpoints")
        self._stop = False

    # ---- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.device = parallel.initialize(self.recipe)
        t = self.t
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        if t.global_batch_size % (t.micro_batch_size * self.dp):
            raise UserError(f"{self.stage}.training.global_batch_size = {t.global_batch_size} is not a multiple of "
                            f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {self.dp}")
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dp)
        self.task.num_microbatches = self.num_micro
        self.is_logger = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                          and self.dp_rank == 0 and parallel_state.get_context_parallel_rank() == 0)
        if dist.get_rank() == 0:
            os.makedirs(self.ckpt_root, exist_ok=True)
            with open(os.path.join(self.dir, "config.yaml"), "w") as f:
                yaml.safe_dump(recipe_to_dict(self.recipe), f, sort_keys=False)
        dist.barrier()

        model = self.task.build_model(torch.bfloat16 if self.bf16 else torch.float32)
        if self.bf16:  # megatron's convention: every param bf16 (Mamba's A_log/D too), fp32 master weights
            model = Float16Module(model.config, model)
        self.model = [wrap_ddp(self.recipe, model, self.task.overlap_grad_reduce_ok())]
        self.optimizer, self.scheduler = build_optimizer(self.recipe, t, self.model, self.bf16,
                                                         self.task.optimizer_overrides())
        hook_model_config(self.model, self.optimizer)
        self.iteration, self.consumed = 0, 0
        self.async_queue = None
        if self.recipe.checkpointing.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        latest = checkpoint.latest_iteration(self.ckpt_root)
        if latest is not None:
            state = checkpoint.load(checkpoint.iter_dir(self.ckpt_root, latest), self.model, self.optimizer,
                                    self.scheduler)
            self.iteration, self.consumed = state["iteration"], state["consumed_samples"]
            self.task.load_state_dict(state.get("task", {}))
            self.log(f"resumed from {checkpoint.iter_dir(self.ckpt_root, latest)} (iteration {self.iteration})")
        elif t.init_from:
            src = resolve_init(self.recipe, t.init_from)
            checkpoint.load(src, [m.module for m in self.model], load_rng=False, missing_ok=self.task.init_missing_ok)
            # bf16: the optimizer's fp32 master weights were copied from the fresh init; refresh them, or the
            # first step writes the random init back into the model
            self.optimizer.reload_model_params()
            self.log(f"initialised weights from {src}")
        self.task.setup(self.model, self.device)
        self.data = self.task_batches(self.consumed)
        p = self.recipe.parallelism
        n_params = sum(p_.numel() for p_ in model.parameters())
        precision = ("bf16" if self.bf16 else "fp32") + ("" if t.fp8 == "none" else " fp8-" + t.fp8)
        kernels = f"{'te' if recipe_uses_te(self.recipe.model) else 'local'} " \
            f"mamba-{mamba_kernels(self.recipe.model.mamba_mem_eff_path)}"
        self.log(f"{self.recipe.run.name}: {n_params:,} parameters on this rank | tp {p.tp} pp {p.pp} ep {p.ep} "
                 f"cp {p.cp} dp {self.dp} | {self.device.type} {precision} {kernels} | "
                 f"{t.train_iters} steps x {t.global_batch_size} x {t.seq_length} tokens ({t.data})")

    def task_batches(self, consumed: int):
        t = self.t
        if t.data == "synthetic":
            from pipeline.training.synthetic import synthetic_batches

            return synthetic_batches(self.recipe.model.vocab_size, t.seq_length, self.recipe.run.seed, consumed,
                                     t.micro_batch_size, self.dp_rank, self.dp)
        from data_prep.loading import train_batches

        return train_batches(self.recipe, self.stage, consumed, t.micro_batch_size, self.dp_rank, self.dp)

    # ---- loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self.setup()  # inside: a bad checkpoint found while setting up still shuts the process groups down
            self._train()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self.async_queue is not None:
                self.async_queue.close()
            parallel.shutdown()

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True

    def _train(self) -> None:
        t, ck = self.t, self.recipe.checkpointing
        writer = (metrics.MetricsWriter(self.dir, self.recipe.logging.tensorboard, resume_step=self.iteration)
                  if self.is_logger else None)
        fpt = metrics.flops_per_token(self.recipe.model, t.seq_length, self.task.teacher_forward)
        peak = metrics.peak_tflops(self.recipe.logging.peak_tflops)
        timer, start_time, start_iter = metrics.StepTimer(), time.perf_counter(), self.iteration
        last_saved = self.iteration if checkpoint.latest_iteration(self.ckpt_root) == self.iteration else None
        values = {}
        while self.iteration < t.train_iters:
            values = self.step()
            self.iteration += 1
            self.consumed += t.global_batch_size
            timer.tick()
            if self.async_queue is not None:  # an async checkpoint that finished writing: mark it the latest
                self.async_queue.maybe_finalize_async_calls(blocking=False)
            if t.eval_interval and self.iteration % t.eval_interval == 0:
                sync_params(self.model)
                evaluated = self.task.evaluate(self.model)
                if evaluated:
                    values.update(evaluated)
                    self.log("validation | " + " | ".join(f"{k} {v:.4f}" for k, v in evaluated.items()),
                             logger_rank=True)
            if self.iteration % self.recipe.logging.log_interval == 0 or self.iteration == t.train_iters:
                step_time = timer.take()
                tokens = t.global_batch_size * t.seq_length / step_time / dist.get_world_size()
                values.update(tokens_per_s_per_gpu=tokens, tflops_per_gpu=tokens * fpt / 1e12,
                              mem_gib=metrics.memory_gib())
                if peak:
                    values["mfu"] = tokens * fpt / (peak * 1e12)
                done = self.iteration - start_iter
                eta = (time.perf_counter() - start_time) / done * (t.train_iters - self.iteration)
                extra = " | ".join(x for x in (self.task.log_extra(values), f"eta {metrics.fmt_eta(eta)}") if x)
                self.log(metrics.log_line(self.iteration, t.train_iters, values, extra), logger_rank=True)
            if writer:  # after the log step's throughput, MFU and memory are in values
                writer.write(self.iteration, values)
            if self._stop_requested():
                self.save()
                self.finish_saves()
                self.log(f"preempted: saved iter {self.iteration}", logger_rank=True)
                return
            if ck.save_interval and self.iteration % ck.save_interval == 0:
                self.save()
                last_saved = self.iteration
        if last_saved != self.iteration:
            self.save()
        self.finish_saves()
        sync_params(self.model)
        self.task.finish(self.dir)
        if self.is_logger:
            writer.close()
            with open(os.path.join(self.dir, "final.json"), "w") as f:
                json.dump({"iteration": self.iteration, "loss": values.get("loss")}, f)
        self.log(f"done: {self.iteration} iterations, checkpoints in {self.ckpt_root}", logger_rank=True)

    def step(self) -> dict:
        t = self.t
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.task.begin_step(self.iteration)
        loss_dicts = get_forward_backward_func()(
            forward_step_func=self.task.forward_step, data_iterator=self.data, model=self.model,
            num_microbatches=self.num_micro, seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
            forward_only=False, **self.task.schedule_kwargs(),
        )
        ok, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if ok and grad_norm is not None else (None if ok else float("nan"))
        values = self.task.reduce_logs(loss_dicts) if parallel_state.is_pipeline_last_stage() else {}
        values = self._average_over_dp(values)
        check_finite(values, grad_norm, self.iteration + 1, self.stage, self.device)  # all ranks stop together
        self.scheduler.step(increment=1)
        values.update(grad_norm=0.0 if grad_norm is None else grad_norm, lr=self.optimizer.param_groups[0]["lr"])
        return values

    def _average_over_dp(self, values: dict) -> dict:
        if not values or self.dp == 1:
            return values
        vec = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(vec, group=parallel_state.get_data_parallel_group())
        return {k: float(v) / self.dp for k, v in zip(values, vec.tolist())}

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save(self) -> None:
        """Write a checkpoint; with ``checkpointing.async_save`` the write runs in the background (megatron's
        async dist-checkpoint save) and the step stalls only for staging the tensors. One save in flight: the
        previous one is finalised first."""
        start = time.perf_counter()
        self.finish_saves()
        sync_params(self.model)
        state = {"consumed_samples": self.consumed, "stage": self.stage, "task": self.task.state_dict()}
        checkpoint.save(self.ckpt_root, self.iteration, self.model, self.optimizer, self.scheduler, state,
                        keep_last=self.recipe.checkpointing.keep_last, async_queue=self.async_queue)
        how = "started async save of" if self.async_queue is not None else "saved"
        self.log(f"{how} checkpoint {checkpoint.iter_dir(self.ckpt_root, self.iteration)} "
                 f"(step stall {time.perf_counter() - start:.2f} s)", logger_rank=True)

    def finish_saves(self) -> None:
        """Wait for an async checkpoint still being written and mark it the latest (no-op for sync saves)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)

    def log(self, msg: str, logger_rank: bool = False) -> None:
        if (self.is_logger if logger_rank else dist.get_rank() == 0):
            print(f"[{self.stage}] {msg}", flush=True)
