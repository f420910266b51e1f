"""Make megatron-core 0.19.2 run on a CPU-only machine (CI, laptops). Active only without CUDA.

megatron-core assumes CUDA in a few dozen places (``torch.cuda.current_device()`` as a device,
``device="cuda"`` literals, CUDA RNG tracker, streams/events, ``torch.cuda.synchronize``) and takes
Mamba-2's SSD scan and gated norm from mamba-ssm's Triton kernels. Rather than editing site-packages, the
modules listed in ``PATCHED_MODULES`` see a ``torch`` whose ``cuda`` namespace and tensor factories map CUDA
to CPU, and the Mamba mixer sees our plain-PyTorch kernels (``te_kernels``). Nothing changes when CUDA is
available. ``report()`` lists the call sites that were actually redirected, so a megatron-core version bump
shows what changed; ``tests/test_compat_cpu.py`` pins the version.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections import Counter

import torch

MCORE_VERSION = "0.19.2"

# modules whose global name ``torch`` is replaced by the CPU proxy
PATCHED_MODULES = (
    "megatron.core.ssm.mamba_mixer",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.attention",  # static inference: the KV cache is allocated on current_device()
    "megatron.core.inference.contexts.static_context",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",  # sequence-parallel gather / reduce-scatter buffers
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",  # checkpointing.async_save
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.validation",
)

_hits: Counter = Counter()
_applied = False


def _record(what: str) -> None:
    frame = sys._getframe(2)
    _hits[f"{frame.f_code.co_filename.split('site-packages/')[-1]}:{frame.f_lineno} {what}"] += 1


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda"
    ):
        return torch.device("cpu")
    return device


class _Dummy:
    """Stands in for CUDA streams, events and stream contexts."""

    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: _Dummy()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def query(self):
        return True


class _CudaNamespace(types.SimpleNamespace):
    """``torch.cuda`` with device queries answered by the CPU and RNG calls mapped to the CPU generator."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    def current_device(self):
        _record("torch.cuda.current_device")
        return torch.device("cpu")

    def synchronize(self, *a, **k):
        _record("torch.cuda.synchronize")

    def empty_cache(self):
        pass

    def is_available(self):
        return False

    def device_count(self):
        return 0

    def current_stream(self, *a, **k):
        _record("torch.cuda.current_stream")
        return _Dummy()

    def stream(self, *a, **k):
        return contextlib.nullcontext()

    Stream = _Dummy
    Event = _Dummy

    def get_rng_state(self, *a, **k):
        _record("torch.cuda.get_rng_state")
        return torch.get_rng_state()

    def set_rng_state(self, state, *a, **k):
        torch.set_rng_state(state)

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def memory_allocated(self, *a, **k):
        return 0

    max_memory_allocated = memory_allocated

    def nvtx(self):
        return torch.cuda.nvtx


_FACTORIES = ("tensor", "empty", "zeros", "ones", "full", "arange", "rand", "randn", "randint",
              "empty_like", "zeros_like", "ones_like", "full_like", "as_tensor", "randperm", "eye")


class _TorchProxy(types.ModuleType):
    """The ``torch`` module as the patched megatron modules see it on CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaNamespace()
        for name in _FACTORIES:
            setattr(self, name, self._factory(getattr(torch, name), name))

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _factory(fn, name):
        def call(*args, **kwargs):
            if "device" in kwargs:
                mapped = _cpu_device(kwargs["device"])
                if mapped is not kwargs["device"]:
                    _record(f"torch.{name}(device=cuda)")
                kwargs["device"] = mapped
            return fn(*args, **kwargs)

        return call


def _tensor_cuda(self, *a, **k):
    _record("Tensor.cuda()")
    return self


_tensor_type_orig = torch.Tensor.type


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    """``param.type() == 'torch.cuda.FloatTensor'`` asserts (optimizers, clip_grads) see the CUDA name."""
    if dtype is None and not kwargs:
        name = _tensor_type_orig(self)
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            _record("Tensor.type()")
            return name.replace("torch.", "torch.cuda.", 1)
        return name
    return _tensor_type_orig(self, dtype, non_blocking, **kwargs)


def apply() -> None:
    """Install the CPU fallbacks (idempotent). A no-op when CUDA is available."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    from importlib.metadata import version as dist_version

    version = dist_version("megatron-core")  # megatron.core.__version__ carries the cwd repo's git hash
    if version != MCORE_VERSION:
        import warnings

        warnings.warn(f"pipeline.compat.cpu is written for megatron-core {MCORE_VERSION}, found {version}; "
                      "re-check the patched call sites (see report())")
    proxy = _TorchProxy()
    for name in PATCHED_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy
    torch.Tensor.cuda = _tensor_cuda
    torch.Tensor.type = _tensor_type
    _install_rng_tracker_on_cpu_generator()
    _install_host_split_sizes()
    _install_mamba_kernels()
    _applied = True


def _install_rng_tracker_on_cpu_generator() -> None:
    """megatron's RNG tracker (TP-distinct init, recompute) swaps CUDA generator states; use the CPU one."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        _record("tensor_parallel.random._get_cuda_rng_state")
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state


def _install_host_split_sizes() -> None:
    """The alltoall MoE dispatcher turns its split sizes into host numpy arrays only when they are on CUDA
    (``maybe_move_tensor_to_cpu`` checks ``is_cuda``); on CPU they stay tensors, which gloo's
    ``all_to_all_single`` rejects. Give it the numpy arrays it gets on GPU."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def to_host(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            _record("moe_utils.maybe_move_tensor_to_cpu(as_numpy)")
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def _install_mamba_kernels() -> None:
    """The Mamba mixer's Triton SSD scan, gated RMSNorm and decode-step kernels -> the plain-PyTorch versions in
    te_kernels."""
    from megatron.core.ssm import mamba_mixer

    if mamba_mixer.HAVE_MAMBA_SSM and mamba_mixer.mamba_chunk_scan_combined is not None:
        return  # real mamba-ssm present (never on CPU: Triton has no CPU backend)
    from te_kernels.gated_rmsnorm import GatedRMSNorm
    from te_kernels.ssd_torch import mamba_chunk_scan_combined

    class ExtendedRMSNorm(GatedRMSNorm):
        """megatron's ExtendedRMSNorm contract: weight TP-sharded along dim 0."""

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
                tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])

    # inference decode steps: PyTorch references of its Triton kernels (its own fallbacks are right at batch 1 only)
    from te_kernels.mamba_decode_torch import causal_conv1d_update, selective_state_update

    mamba_mixer.causal_conv1d_update = causal_conv1d_update
    mamba_mixer.selective_state_update = selective_state_update
    mamba_mixer.mamba_chunk_scan_combined = mamba_chunk_scan_combined
    mamba_mixer.ExtendedRMSNorm = ExtendedRMSNorm
    mamba_mixer.RMSNormGated = GatedRMSNorm
    mamba_mixer.HAVE_MAMBA_SSM = True


def report() -> str:
    """The call sites redirected so far in this process, most frequent first."""
    return "\n".join(f"{n:6d}  {site}" for site, n in _hits.most_common())
