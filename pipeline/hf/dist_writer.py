"""Write a megatron-core dist checkpoint (``torch_dist``) one tensor at a time, without the model's weights.

The megatron model is built on the *meta* device at this rank's TP/EP/PP layout, so
``model.sharded_state_dict()`` states exactly which checkpoint keys, global shapes, shard offsets and
objects the real model at that layout would save and load (megatron-core's own naming, Mamba in_proj
pieces and expert axes included), at no memory cost. Those entries become the write plan of
``torch.distributed.checkpoint`` (the format megatron's ``torch_dist`` backend is), and each shard's data
is produced lazily by a callback when the writer asks for it. The result is the same format
``dist_checkpointing.save`` writes (``metadata.json``, ``.metadata``, ``__<rank>_0.distcp``, the common
state object), so ``pipeline.training.checkpoint.load`` loads it into the model at any layout.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories, is_main_replica

from pipeline.config.schema import Recipe
from pipeline.errors import UserError

Materialize = Callable[[ShardedTensor], torch.Tensor]


def meta_model(recipe: Recipe, dtype: torch.dtype):
    """The recipe's HybridModel on the meta device (local spec: its checkpoint keys are the TE keys)."""
    from megatron.core import parallel_state

    from pipeline.model.build import hybrid_model, transformer_config

    config = transformer_config(recipe, dtype, use_cpu_init=True, use_te=False)
    config.perform_initialization = False  # nothing to initialise on meta
    config.moe_grouped_gemm = False  # SequentialMLP and grouped GEMM share checkpoint keys
    with torch.device("meta"):
        return hybrid_model(recipe, config, use_te=False, pre_process=parallel_state.is_pipeline_first_stage(),
                            post_process=parallel_state.is_pipeline_last_stage())


def sharded_entries(model) -> Tuple[List[ShardedTensor], List[ShardedObject]]:
    """The shards this rank writes (main replicas): tensors and objects (``_extra_state``)."""
    sd = model.sharded_state_dict()
    apply_factories(sd)
    tensors, objects = [], []
    for v in nested_values(sd):
        if isinstance(v, ShardedTensor) and is_main_replica(v.replica_id):
            tensors.append(v)
        elif isinstance(v, ShardedObject) and is_main_replica(v.replica_id):
            objects.append(v)
    return tensors, objects


def chunk_shape(sh: ShardedTensor) -> Tuple[int, ...]:
    """Shape of the stored chunk: prepended axes (expert axis) become leading 1s, as megatron stores them."""
    return (1,) * sh.prepend_axis_num + tuple(sh.local_shape)


def _tensor_item(sh: ShardedTensor) -> WriteItem:
    offsets = torch.Size(sh.global_offset)
    return WriteItem(
        index=MetadataIndex(sh.key, offsets),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(chunk_shape(sh))),
                                    properties=TensorProperties(dtype=sh.data.dtype),
                                    size=torch.Size(sh.global_shape)),
    )


class _LazyPlanner(DefaultSavePlanner):
    """A save plan from shard descriptions; shard data is produced when the storage writer asks for it."""

    def __init__(self, tensors: List[ShardedTensor], objects: List[ShardedObject], materialize: Materialize,
                 on_write: Optional[Callable[[int], None]] = None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._tensors = {(t.key, tuple(t.global_offset)): t for t in tensors}
        self._objects = {o.unique_key: o for o in objects}
        self._items = [_tensor_item(t) for t in tensors]
        self._items += [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in self._objects]
        self._materialize, self._on_write = materialize, on_write
        self._previous: Optional[torch.Tensor] = None

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(items=self._items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        if index.offset is None:  # a ShardedObject: megatron stores the list of this key's local data
            return [self._objects[index.fqn].data]
        self.release()
        sh = self._tensors[(index.fqn, tuple(index.offset))]
        data = self._materialize(sh)
        want = chunk_shape(sh)
        if tuple(data.shape) != want or data.dtype != sh.data.dtype:
            raise ValueError(f"{sh.key} at {tuple(sh.global_offset)}: produced {data.dtype}{list(data.shape)}, "
                             f"checkpoint expects {sh.data.dtype}{list(want)}")
        if self._on_write:
            self._on_write(data.numel() * data.element_size())
        self._previous = data.clone(memory_format=torch.contiguous_format)  # storage owned by us alone
        return self._previous

    def release(self) -> None:
        """Free the previously returned shard. torch 2.13's FileSystemWriter keeps a reference to every
        tensor it wrote until its file is closed (for its safetensors option), which would hold a rank's
        whole share; the serial writer asks for the next shard only after writing the previous one, so
        emptying the previous shard's storage here is safe and keeps one shard alive."""
        if self._previous is not None:
            self._previous.untyped_storage().resize_(0)
            self._previous = None


def save_lazy(ckpt_dir: str, tensors: List[ShardedTensor], objects: List[ShardedObject], common: Dict[str, Any],
              materialize: Materialize, on_write: Optional[Callable[[int], None]] = None) -> None:
    """Collective: every rank passes its shards; ``ckpt_dir`` must exist. ``common`` is stored once (rank 0)
    as megatron's ``common_state`` object and comes back from ``dist_checkpointing.load_common_state_dict``."""
    rank = dist.get_rank()
    if rank == 0:
        objects = objects + [ShardedObject("common_state", common, (1,), (0,), replica_id=0)]
    # one thread, no copy-ahead: the serial loader resolves a shard only when it is about to be written
    writer = dcp.FileSystemWriter(ckpt_dir, single_file_per_rank=True, sync_files=True, thread_count=1,
                                  per_thread_copy_ahead=0)
    planner = _LazyPlanner(tensors, objects, materialize, on_write)
    try:
        dcp.save({}, storage_writer=writer, planner=planner)
    except CheckpointException as e:  # DCP wraps every rank's failure; surface a user mistake as such
        for exc, _ in e.failures.values():
            if isinstance(exc, UserError):
                raise exc from None
        raise
    finally:
        planner.release()
    if rank == 0:
        save_config(CheckpointingConfig("torch_dist", 1), ckpt_dir)
    dist.barrier()


def local_bytes(tensors: List[ShardedTensor]) -> int:
    total = 0
    for t in tensors:
        n = 1
        for s in t.local_shape:
            n *= s
        total += n * t.data.element_size()
    return total
