"""Process groups: torch.distributed + megatron-core ``parallel_state`` from the recipe.

Works under torchrun / srun (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, or SLURM_*
variables) and as a single process (a private gloo group). NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel

from pipeline.config.schema import Recipe
from pipeline.errors import UserError


def _env_from_slurm() -> None:
    """srun-native launch: one task per GPU, ranks from SLURM_* when torchrun did not set them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(recipe: Recipe) -> torch.device:
    want = recipe.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device = cuda but no CUDA device is visible")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def initialize(recipe: Recipe) -> torch.device:
    """Initialise torch.distributed and megatron's model-parallel groups; returns this rank's device."""
    from pipeline.compat import cpu as cpu_compat

    _env_from_slurm()
    device = device_for(recipe)
    if device.type == "cpu":
        cpu_compat.apply()
    else:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ:  # torchrun / srun
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        else:  # a single process: a private group (os.environ untouched, so child processes are unaffected)
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1, timeout=timedelta(minutes=30))
    p = recipe.parallelism
    world = dist.get_world_size()
    if world % (p.tp * p.pp * p.cp):
        raise UserError(f"world size {world} is not divisible by tp*pp*cp = {p.tp * p.pp * p.cp}")
    dp = world // (p.tp * p.pp * p.cp)
    if p.ep > dp * p.cp:
        raise UserError(f"parallelism.ep = {p.ep} exceeds the data-parallel size {dp * p.cp}")
    if (world // p.pp) % (p.ep * p.etp):
        raise UserError(f"parallelism.ep x etp = {p.ep} x {p.etp} does not divide the {world // p.pp} ranks of a "
                        f"pipeline stage (world size {world} / pp {p.pp})")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
    )
    seed(recipe.run.seed)
    return device


def seed(value: int) -> None:
    """Same seed on every DP rank, distinct per PP stage; megatron's tracker handles TP/EP streams."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(value + 100 * pp_rank)
    tensor_parallel.model_parallel_cuda_manual_seed(value + 100 * pp_rank)


def data_parallel_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
