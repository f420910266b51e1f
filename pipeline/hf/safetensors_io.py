"""Streaming safetensors: read one tensor (or a row range) at a time, write a shard tensor by tensor.

The format (github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw bytes.
Plain file reads instead of mmap keep the resident set at the tensors in hand: an mmap'd shard counts
every touched page, so RSS would grow towards the shard size (the Nano parent's shards are ~5 GB).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from pipeline.errors import UserError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (the header is not a JSON object)")
    meta = header.pop("__metadata__", {}) or {}
    infos = {}
    for name, h in header.items():
        try:
            if h["dtype"] not in DTYPES:
                raise UserError(f"{path}: tensor {name} has unsupported dtype {h['dtype']}")
            begin, end = h["data_offsets"]
            infos[name] = TensorInfo(path, DTYPES[h["dtype"]], tuple(h["shape"]), 8 + n + begin, end - begin)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: malformed safetensors header entry for tensor {name}") from None
    return infos, meta


class SafetensorsDir:
    """The tensors of an HF checkpoint directory (one ``model.safetensors`` or an index + shards)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            from pipeline.hf.files import read_json

            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: no weight_map object")
            files = sorted(set(map(str, weight_map.values())))
        elif os.path.isfile(os.path.join(path, SINGLE)):
            files = [SINGLE]
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors")) if os.path.isdir(path) else []
            if not files:
                raise UserError(f"{path}: no {INDEX}, {SINGLE} or *.safetensors found")
        self.tensors: Dict[str, TensorInfo] = {}
        for name in files:
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                raise UserError(f"{index}: names shard {name}, which is missing")
            infos, _ = read_header(full)
            for key in infos.keys() & self.tensors.keys():
                raise UserError(f"{path}: tensor {key} appears in both {self.tensors[key].file} and {full}")
            self.tensors.update(infos)

    def read(self, name: str, rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Tensor ``name`` (rows [a, b) of its first dimension when ``rows`` is given)."""
        info = self.tensors[name]
        shape, start, nbytes = list(info.shape), info.start, info.nbytes
        if rows is not None:
            row_bytes = nbytes // shape[0] if shape[0] else 0
            start += rows[0] * row_bytes
            shape[0] = rows[1] - rows[0]
            nbytes = shape[0] * row_bytes
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(info.file, "rb") as f:
            f.seek(start)
            if f.readinto(buf.numpy()) != nbytes:
                raise UserError(f"{info.file}: truncated while reading tensor {name}")
        return buf.view(info.dtype).reshape(shape)


class ShardWriter:
    """Write one safetensors file whose tensor list (names, dtypes, shapes) is known up front.

    The header goes first, then each tensor's bytes as it arrives, in the declared order; so a shard of
    any size passes through memory one tensor at a time.
    """

    def __init__(self, path: str, entries: Sequence[Tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = path
        self.order: List[Tuple[str, torch.dtype, Tuple[int, ...]]] = [(n, d, tuple(s)) for n, d, s in entries]
        header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
        for name, dtype, shape in self.order:
            nbytes = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)  # align the data section to 8 bytes, as the reference writer does
        self.nbytes = 8 + len(text) + offset
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(text)) + text)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape = self.order[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected {want} {DTYPE_NAMES[dtype]}{list(shape)} next, "
                             f"got {name} {DTYPE_NAMES.get(tensor.dtype, tensor.dtype)}{list(tensor.shape)}")
        self._f.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self.order)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()


def plan_shards(entries: Iterable[Tuple[str, torch.dtype, Sequence[int]]], max_bytes: int):
    """Split tensors (in order) into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for name, dtype, shape in entries:
        nbytes = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, dtype, tuple(shape)))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def tensor_bytes(entries: Iterable[Tuple[str, torch.dtype, Sequence[int]]]) -> int:
    return sum(_numel(shape) * torch.empty(0, dtype=dtype).element_size() for _, dtype, shape in entries)


def write_model_files(out: str, entries: Sequence[Tuple[str, torch.dtype, Sequence[int]]],
                      tensors: Iterator[Tuple[str, torch.Tensor]], max_shard_bytes: int, bar=None) -> None:
    """``tensors`` ((name, tensor) in the order of ``entries``) into ``out`` as ``model.safetensors`` or
    numbered shards plus the index, one tensor in memory at a time; ``bar`` (tqdm) advances by bytes."""
    shards = plan_shards(entries, max_shard_bytes)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        writer = ShardWriter(os.path.join(out, fname), shard)
        try:
            for name, _, _ in shard:
                got, tensor = next(tensors)
                writer.write(got, tensor)
                weight_map[name] = fname
                if bar is not None:
                    bar.update(tensor.numel() * tensor.element_size())
                del tensor
            writer.close()
        except BaseException:
            writer.abort()
            raise
    if len(shards) > 1:
        with open(os.path.join(out, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": tensor_bytes(entries)}, "weight_map": weight_map}, f, indent=2)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
