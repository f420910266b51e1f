"""Sharded checkpoints through ``megatron.core.dist_checkpointing`` (reshardable across TP/PP/EP/DP).

Layout of a stage directory::

    checkpoints/iter_0000500/                  # one dist checkpoint: model, optimizer, scheduler, state, rng
    checkpoints/latest_checkpointed_iteration.txt   # written last, so a torn save is never picked up

``state`` is plain data (iteration, consumed samples, world size, task extras); RNG states are per rank and
are restored only at the same world size.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import queue
import re
import shutil
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import StrictHandling
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.utils import unwrap_model

from pipeline.errors import UserError
from pipeline.training import te_extra_state

LATEST = "latest_checkpointed_iteration.txt"
# DistributedOptimizer state per DP shard (reshardable across DP sizes; a TP/PP/EP change restarts the
# optimizer from the model weights through training.init_from). "fully_reshardable" fails to load in 0.19.2
# without TE/apex (no per-param "step").
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        text = f.read(64).decode("utf-8", errors="replace").strip()
    if not text.isdigit():
        raise UserError(f"{path}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def resolve(path_or_root: str) -> str:
    """A checkpoint directory from either an ``iter_*`` dir or a ``checkpoints`` root (its latest)."""
    if os.path.isfile(os.path.join(path_or_root, "metadata.json")):
        _check_dir(path_or_root)
        return path_or_root
    it = latest_iteration(path_or_root)
    if it is None:
        raise UserError(f"no checkpoint found at {path_or_root} (no metadata.json, no {LATEST})")
    d = iter_dir(path_or_root, it)
    if not os.path.isdir(d):
        raise UserError(f"{os.path.join(path_or_root, LATEST)} names iteration {it} but {d} is missing")
    _check_dir(d)
    return d


@functools.lru_cache(maxsize=None)
def _async_manager():
    """The fork-context manager process that holds the async writer's results queue (one per process)."""
    return multiprocessing.get_context("fork").Manager()


def _thread_results_queue(async_save: bool = False) -> None:
    # Synchronous saves write from threads; megatron still creates a spawn-context Manager queue for them
    # (7 s per process and a __main__ guard requirement). A thread-safe queue is all they need. An async save
    # writes from a forked process, which puts its write results on this queue and exits: a plain
    # multiprocessing.Queue deadlocks once those results outgrow the pipe buffer (64 KiB, ~2,000 tensors; the
    # writer cannot exit until someone reads, and the trainer reads only after it exits: seen on the 1.1B proxy),
    # so the queue lives in a manager process (fork context: started in milliseconds, once per process).
    current = filesystem_async._results_queue
    if async_save and (current is None or isinstance(current, queue.Queue)):
        filesystem_async._results_queue = _async_manager().Queue()
    elif current is None:
        filesystem_async._results_queue = queue.Queue()


def _rank_object(key: str, data: Any) -> ShardedObject:
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject(key, data, (world,), (rank,), replica_id=0)


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _model_sharded(model_chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    n = len(model_chunks)
    return {_model_key(i, n): unwrap_model(m).sharded_state_dict() for i, m in enumerate(model_chunks)}


def rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"cpu": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(root: str, iteration: int, model_chunks, optimizer=None, scheduler=None, state=None,
         keep_last: int = 0, async_queue=None) -> str:
    """Write a checkpoint; the latest marker is written (and old checkpoints pruned) once it is complete.

    ``async_queue``: a megatron ``AsyncCallsQueue`` — the tensors are staged to host memory now and written by a
    forked process while training goes on; the marker is written by the request's finalisation
    (``async_queue.maybe_finalize_async_calls``, which the caller runs on every rank), so a crash mid-write
    leaves the previous checkpoint as the latest."""
    _thread_results_queue(async_save=async_queue is not None)
    d = iter_dir(root, iteration)
    if dist.get_rank() == 0:
        if os.path.isdir(d):
            shutil.rmtree(d)  # a torn save of the same iteration from a killed run
        os.makedirs(d)
    dist.barrier()
    sd = _model_sharded(model_chunks)
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=False, metadata=OPTIMIZER_METADATA)
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    sd["state"] = dict(state or {}, iteration=iteration, world_size=dist.get_world_size())
    sd["rng"] = _rank_object("rng_state", rng_state())
    finish = partial(_mark_latest, root, iteration, keep_last)
    if async_queue is None:
        dist_checkpointing.save(sd, d)
        finish()
        return d
    # megatron's own async writer (nvidia-resiliency-ext's "nvrx" is not a dependency)
    request = dist_checkpointing.save(sd, d, async_sharded_save=True, async_strategy="mcore")
    request.add_finalize_fn(finish)
    async_queue.schedule_async_request(request)
    return d


def _mark_latest(root: str, iteration: int, keep_last: int) -> None:
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = os.path.join(root, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(root, LATEST))
        _prune(root, keep_last)
    dist.barrier()


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    iters = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("iter_") and n[5:].isdigit())
    for it in iters[:-keep_last]:
        shutil.rmtree(iter_dir(root, it), ignore_errors=True)


def load(ckpt: str, model_chunks, optimizer=None, scheduler=None, load_rng: bool = True,
         missing_ok: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Load a full training state (or only the model when optimizer is None); returns ``state``.

    Model keys containing one of ``missing_ok`` are not read (modules a later stage adds to the parent)."""
    _check_dir(ckpt)
    sd = _model_sharded(model_chunks)
    if missing_ok:
        sd = {k: {n: v for n, v in chunk.items() if not any(s in n for s in missing_ok)} for k, chunk in sd.items()}
    if optimizer is not None:
        _init_adam_steps(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=True, metadata=OPTIMIZER_METADATA)
    try:
        common = dist_checkpointing.load_common_state_dict(ckpt)
    except Exception as e:  # a torn or foreign common.pt
        raise UserError(f"{ckpt}: cannot read the checkpoint's common state ({_first_line(e)})") from None
    same_world = common.get("state", {}).get("world_size") == dist.get_world_size()
    if load_rng and same_world:
        sd["rng"] = _rank_object("rng_state", None)
    try:
        loaded, ckpt_only, model_only = dist_checkpointing.load(sd, ckpt, strict=StrictHandling.RETURN_ALL)
    except Exception as e:  # a checkpoint of another model: name the tensor that does not fit
        raise UserError(f"{ckpt}: cannot load into this model: {_first_line(e)[:300]}") from None
    _check_accounted(ckpt, ckpt_only, model_only, missing_ok, model_only_load=optimizer is None)
    for i, m in enumerate(model_chunks):
        chunk = te_extra_state.vetted(loaded[_model_key(i, len(model_chunks))], ckpt)
        with te_extra_state.allow_vetted_pickles():
            missing, unexpected = unwrap_model(m).load_state_dict(chunk, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state") and not any(s in k for s in missing_ok)]
        if missing:
            raise UserError(f"{ckpt}: checkpoint lacks {len(missing)} tensors of this model, e.g. {missing[0]}")
    if optimizer is not None:
        try:
            optimizer.load_state_dict(loaded["optimizer"])
        except ValueError as e:  # megatron matches param groups by their lr / min_lr / weight-decay settings
            if "parameter group" not in str(e):
                raise
            raise UserError(f"{ckpt}: its optimizer state was saved under other training.lr / min_lr / weight_decay "
                            "values; resume with those, or start a new run from its weights with "
                            f"training.init_from={ckpt}") from None
    if scheduler is not None and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
    if "rng" in loaded:
        set_rng_state(loaded["rng"])
    return common.get("state", {})


def _is_backend_state(key: str) -> bool:
    """Transformer Engine's per-module ``_extra_state`` (FP8 scaling metadata): a local-backend checkpoint has none,
    a local-backend model reads none; everything else must match across the two layouts."""
    return "._extra_state" in key


def _is_training_state(key: str) -> bool:
    """Optimizer (plain, distributed, or megatron's ChainedOptimizer's ``chained_N.`` prefix) and RNG state: what a
    model-only load leaves in the checkpoint on purpose."""
    return re.match(r"(chained_\d+\.)?optimizer\b|rng_state", key) is not None


def _check_accounted(ckpt: str, ckpt_only, model_only, missing_ok: Tuple[str, ...], model_only_load: bool) -> None:
    """Every tensor accounted for, both ways: a parameter the checkpoint does not hold stays uninitialised, and a
    checkpoint tensor the model does not read is a weight lost (a norm under a name the other layout maps
    differently) — either is an error, never a warning."""
    allowed = lambda key: _is_backend_state(key) or any(s in key for s in missing_ok)  # noqa: E731
    lacking = sorted(k for k in model_only if not allowed(k))
    if lacking:
        raise UserError(f"{ckpt}: checkpoint lacks {len(lacking)} tensor(s) of this model, e.g. {lacking[0]}")
    skip_state = lambda key: model_only_load and _is_training_state(key)  # noqa: E731
    unread = sorted(k for k in ckpt_only if not allowed(k) and not skip_state(k) and not k.startswith("rng_state"))
    if unread:
        raise UserError(f"{ckpt}: {len(unread)} checkpoint tensor(s) would not be loaded into this model, "
                        f"e.g. {unread[0]}")


def _init_adam_steps(optimizer) -> None:
    """Without TE/apex, megatron's DistributedOptimizer reads one common Adam ``step`` from the torch
    optimizer's state when building its state dict, but a fresh optimizer's init_state_fn creates only the
    moments: give every param state a step (overwritten by the checkpoint) so loading works."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner, init = getattr(opt, "optimizer", None), getattr(opt, "init_state_fn", None)
        if inner is None or init is None or not hasattr(opt, "buffers"):  # DistributedOptimizer only
            continue
        init(inner, opt.config)
        for state in inner.state.values():
            state.setdefault("step", torch.tensor(0.0))


def _check_dir(ckpt: str) -> None:
    from pipeline.hf.files import read_json

    if not os.path.isfile(os.path.join(ckpt, "metadata.json")):
        raise UserError(f"{ckpt} is not a megatron dist checkpoint (metadata.json missing)")
    read_json(os.path.join(ckpt, "metadata.json"), "checkpoint metadata")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
