"""Stream a source's inputs as ordered chunks of raw items, never loading a whole corpus.

A chunk holds items of one kind: ``line`` (bytes of JSON lines), ``file`` (bytes of whole text files, one
document each), ``record`` (already parsed dicts: parquet / arrow / HF rows, JSON arrays) or ``dropped`` (a
``formats.Dropped`` found while reading). An item's location is ``path:N`` with N its line (jsonl), row
(parquet, arrow, HF datasets) or record number (JSON array), 1-based; a text file's is its path. Locations
are only spelled out for the items that get dropped. Each chunk also carries how many input bytes it
covers, for the progress bar.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, List, Optional

from data_prep.formats import Dropped
from pipeline.errors import UserError

LINE_EXTS = (".jsonl", ".ndjson", ".jsonl.gz")
RECORDS_PER_CHUNK = 1024
BYTES_PER_CHUNK = 1 << 20


@dataclass
class Chunk:
    kind: str  # line | file | record | dropped
    payloads: list
    nbytes: int  # input bytes this chunk covers (progress)
    path: str = ""
    first: int = 1  # number of the first item in path (line / row / record)
    locations: Optional[List[str]] = None  # explicit locations (text files, read errors)

    def location(self, i: int) -> str:
        return self.locations[i] if self.locations is not None else f"{self.path}:{self.first + i}"


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
    """Chunks of every input under ``path``, in a fixed order."""
    if is_hf_dataset_dir(path):
        yield from _hf_chunks(path, hf_split)
        return
    texts, text_bytes = [], 0  # consecutive plain text files travel together
    for f in input_files(path):
        name = f.lower()
        if not name.endswith(LINE_EXTS + (".json", ".parquet", ".arrow")):
            texts.append(f)
            text_bytes += os.path.getsize(f)
            if len(texts) >= RECORDS_PER_CHUNK or text_bytes >= BYTES_PER_CHUNK:
                yield _text_chunk(texts)
                texts, text_bytes = [], 0
            continue
        if texts:
            yield _text_chunk(texts)
            texts, text_bytes = [], 0
        if name.endswith(LINE_EXTS) or (name.endswith(".json") and _first_char(f) != "["):
            yield from _line_chunks(f)
        elif name.endswith(".json"):
            yield from _json_array_chunks(f)
        elif name.endswith(".parquet"):
            yield from _parquet_chunks(f)
        else:
            yield from _arrow_chunks(f)
    if texts:
        yield _text_chunk(texts)


def _dropped(location: str, reason: str, detail: str, nbytes: int) -> Chunk:
    return Chunk("dropped", [Dropped(reason, detail)], nbytes, locations=[location])


def _text_chunk(paths: List[str]) -> Chunk:
    payloads = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                payloads.append(f.read())
        except OSError as e:  # e.g. no read permission: counted as unreadable, named by its path
            payloads.append(Dropped("unreadable", e.strerror or str(e)))
    return Chunk("file", payloads, sum(len(x) for x in payloads if isinstance(x, bytes)), locations=list(paths))


def _line_chunks(path: str) -> Iterator[Chunk]:
    gz = path.endswith(".gz")
    first = 1
    try:
        f = (gzip.open if gz else open)(path, "rb")
    except OSError as e:
        yield _dropped(path, "unreadable", e.strerror or str(e), 0)
        return
    with f:
        done = 0
        while True:
            try:
                lines = f.readlines(BYTES_PER_CHUNK)  # whole lines, about this many bytes
            except (EOFError, OSError, zlib.error) as e:  # a truncated or corrupt .gz: the rest is lost
                what = "truncated or corrupt gzip stream" if gz else "read error"
                yield _dropped(f"{path}:{first}", "unreadable", f"{what} from here on ({e})"[:200], 0)
                return
            if not lines:
                break
            pos = f.fileobj.tell() if gz else done + sum(map(len, lines))  # progress: compressed bytes
            yield Chunk("line", lines, pos - done, path, first)
            first += len(lines)
            done = pos


def _first_char(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError:
        return ""  # read as lines, whose reader reports the error with the path
    return head[:1].decode("latin-1")


def _record_chunks(path: str, rows, num_rows: int, size: int) -> Iterator[Chunk]:
    """Chunks of parsed records; progress spreads the file's ``size`` bytes over its ``num_rows`` rows."""
    first, batch = 1, []
    for row in rows:
        batch.append(row)
        if len(batch) >= RECORDS_PER_CHUNK:
            yield _records(path, batch, first, num_rows, size)
            first, batch = first + len(batch), []
    if batch:
        yield _records(path, batch, first, num_rows, size)


def _records(path: str, batch: list, first: int, num_rows: int, size: int) -> Chunk:
    end = first - 1 + len(batch)
    nbytes = size * end // max(num_rows, 1) - size * (first - 1) // max(num_rows, 1)
    return Chunk("record", batch, nbytes, path, first)


def _json_array_chunks(path: str) -> Iterator[Chunk]:
    size = os.path.getsize(path)
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except UnicodeDecodeError as e:
        yield _dropped(path, "not_utf8", f"byte {e.start}", size)
        return
    except json.JSONDecodeError as e:
        yield _dropped(f"{path}:{e.lineno}", "malformed_json", f"{e.msg} (the whole array)", size)
        return
    if not isinstance(records, list):
        records = [records]
    yield from _record_chunks(path, records, len(records), size)


def _rows(batches):
    for batch in batches:
        yield from batch.to_pylist()


def _parquet_chunks(path: str) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=RECORDS_PER_CHUNK)
        yield from _record_chunks(path, _rows(batches), pf.metadata.num_rows, os.path.getsize(path))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        yield _dropped(path, "unreadable", f"{type(e).__name__}: {e}"[:200], 0)


def _arrow_chunks(path: str) -> Iterator[Chunk]:
    import pyarrow as pa

    try:
        source = pa.memory_map(path)
        try:
            table = pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:  # HF datasets' cache files use the streaming format
            table = pa.ipc.open_stream(source).read_all()
    except (OSError, ValueError) as e:
        yield _dropped(path, "unreadable", f"{type(e).__name__}: {e}"[:200], os.path.getsize(path))
        return
    batches = table.to_batches(max_chunksize=RECORDS_PER_CHUNK)
    yield from _record_chunks(path, _rows(batches), table.num_rows, os.path.getsize(path))


def _hf_chunks(path: str, split: str) -> Iterator[Chunk]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # a torn state.json / dataset_info.json / arrow file of a saved dataset
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: cannot load the saved HF dataset ({type(e).__name__}: {first[:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: the saved HF dataset has splits {', '.join(ds)}, not {split!r} "
                            "(set the source's hf_split)")
        ds = ds[split]
    size = sum(os.path.getsize(f["filename"]) for f in ds.cache_files)
    rows = (dict(zip(batch, values)) for batch in ds.iter(batch_size=RECORDS_PER_CHUNK)
            for values in zip(*batch.values()))
    yield from _record_chunks(path, rows, len(ds), size)
