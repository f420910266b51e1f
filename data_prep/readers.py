"""Stream a source's inputs as ordered chunks of raw items, never loading a whole corpus.

An item is ``(location, kind, payload)``: kind ``line`` (bytes of one JSON line), ``file`` (bytes of one text
file, one document), ``record`` (an already parsed dict: parquet / arrow / HF rows, JSON arrays) or
``dropped`` (a ``formats.Dropped`` found while reading). Locations are ``path:N`` with N the line (jsonl),
row (parquet, arrow, HF datasets) or record number (JSON array), 1-based; a text file is its path.
Each chunk also carries how many input bytes it covers, for the progress bar.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Tuple

from data_prep.formats import Dropped
from pipeline.errors import UserError

LINE_EXTS = (".jsonl", ".ndjson", ".jsonl.gz")
TABLE_EXTS = (".parquet", ".arrow")
RECORDS_PER_CHUNK = 1024
BYTES_PER_CHUNK = 4 << 20


@dataclass
class Chunk:
    items: List[Tuple[str, str, object]] = field(default_factory=list)
    nbytes: int = 0  # input bytes this chunk covers (progress)
    payload_bytes: int = 0  # bytes held in the items (chunk sizing)


def input_files(path: str) -> List[str]:
    """The files a source path stands for, in a fixed order (a directory is walked, hidden files skipped)."""
    if os.path.isfile(path):
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    return files


def is_hf_dataset_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def total_bytes(path: str):
    """Input bytes for the progress bar (None for a saved HF dataset, whose files hold other splits too)."""
    return None if is_hf_dataset_dir(path) else sum(os.path.getsize(f) for f in input_files(path))


def iter_chunks(path: str, hf_split: str = "train") -> Iterator[Chunk]:
    """Chunks of items of every input under ``path``, in a fixed order."""
    if is_hf_dataset_dir(path):
        yield from _chunked(_hf_items(path, hf_split))
        return
    for f in input_files(path):
        yield from _chunked(_file_items(f))


def _chunked(items: Iterator[Tuple[Tuple[str, str, object], int]]) -> Iterator[Chunk]:
    chunk = Chunk()
    for item, nbytes in items:
        chunk.items.append(item)
        chunk.nbytes += nbytes
        payload = item[2]
        chunk.payload_bytes += len(payload) if isinstance(payload, bytes) else 64
        if len(chunk.items) >= RECORDS_PER_CHUNK or chunk.payload_bytes >= BYTES_PER_CHUNK:
            yield chunk
            chunk = Chunk()
    if chunk.items:
        yield chunk


def _file_items(path: str):
    name = path.lower()
    if name.endswith(LINE_EXTS):
        yield from _line_items(path)
    elif name.endswith(".json"):
        yield from (_line_items(path) if _first_char(path) != "[" else _json_array_items(path))
    elif name.endswith(".parquet"):
        yield from _parquet_items(path)
    elif name.endswith(".arrow"):
        yield from _arrow_items(path)
    else:
        with open(path, "rb") as f:
            raw = f.read()
        yield (path, "file", raw), len(raw)


def _line_items(path: str):
    gz = path.endswith(".gz")
    with (gzip.open if gz else open)(path, "rb") as f:
        done = 0
        for lineno, line in enumerate(f, 1):
            pos = f.fileobj.tell() if gz else done + len(line)  # progress counts compressed bytes
            yield (f"{path}:{lineno}", "line", line), pos - done
            done = pos


def _first_char(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head[:1].decode("latin-1")


def _json_array_items(path: str):
    size = os.path.getsize(path)
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except UnicodeDecodeError as e:
        yield (path, "dropped", Dropped("not_utf8", f"byte {e.start}")), size
        return
    except json.JSONDecodeError as e:
        yield (f"{path}:{e.lineno}", "dropped", Dropped("malformed_json", f"{e.msg} (the whole array)")), size
        return
    yield from _numbered(path, records, len(records), size)


def _numbered(path: str, records, n: int, size: int):
    """``path:i`` for the i-th record (1-based); progress spreads ``size`` bytes over the ``n`` records."""
    for i, rec in enumerate(records, 1):
        yield (f"{path}:{i}", "record", rec), size * i // max(n, 1) - size * (i - 1) // max(n, 1)


def _rows(batches):
    for batch in batches:
        yield from batch.to_pylist()


def _parquet_items(path: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=RECORDS_PER_CHUNK)
        yield from _numbered(path, _rows(batches), pf.metadata.num_rows, os.path.getsize(path))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        yield (path, "dropped", Dropped("unreadable", f"{type(e).__name__}: {e}"[:200])), 0


def _arrow_items(path: str):
    import pyarrow as pa

    try:
        source = pa.memory_map(path)
        try:
            table = pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:  # HF datasets' cache files use the streaming format
            table = pa.ipc.open_stream(source).read_all()
    except (OSError, ValueError) as e:
        yield (path, "dropped", Dropped("unreadable", f"{type(e).__name__}: {e}"[:200])), os.path.getsize(path)
        return
    batches = table.to_batches(max_chunksize=RECORDS_PER_CHUNK)
    yield from _numbered(path, _rows(batches), table.num_rows, os.path.getsize(path))


def _hf_items(path: str, split: str):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: the saved HF dataset has splits {', '.join(ds)}, not {split!r} "
                            "(set the source's hf_split)")
        ds = ds[split]
    size = sum(os.path.getsize(f["filename"]) for f in ds.cache_files)
    rows = (dict(zip(batch, values)) for batch in ds.iter(batch_size=RECORDS_PER_CHUNK)
            for values in zip(*batch.values()))
    yield from _numbered(path, rows, len(ds), size)
