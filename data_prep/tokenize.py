"""Parallel tokenization: chunks of raw items -> one flat token array per chunk, in input order.

Workers parse JSON, render chat templates and call the fast tokenizer's batched ``encode_batch`` (its own
threading off, so ``num_workers`` is the parallelism). At most ``2 * workers`` chunks are in flight, so a
corpus of any size streams through bounded memory, and results come back in input order, so the output
does not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Tuple

import numpy as np

from data_prep import formats
from data_prep.formats import Dropped
from data_prep.readers import Chunk


@dataclass(frozen=True)
class TokenizeJob:
    """What a worker needs to turn one source's items into tokens (picklable)."""

    tokenizer_dir: str
    format: str  # text | chat
    text_field: str
    messages_field: str
    inline_reasoning: bool  # the template ignores reasoning_content: inline it as <think>...</think>
    eod: int
    dtype: str  # numpy dtype of the output token ids


@dataclass
class ChunkResult:
    tokens: np.ndarray  # every written document of the chunk, each followed by EOD
    lengths: np.ndarray  # tokens per written document (EOD included)
    drops: List[Tuple[str, str, str]] = field(default_factory=list)  # (location, reason, detail), in order
    read: int = 0
    nbytes: int = 0


_TOKENIZERS: Dict[str, object] = {}
_JOB: TokenizeJob = None


def load_tokenizer(path: str):
    """The HF tokenizer at ``path``, loaded once per process (forked workers inherit the parent's)."""
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


def _content(kind: str, payload, job: TokenizeJob):
    """The document text (format text) or the validated messages (format chat) of one item."""
    if kind == "dropped" or isinstance(payload, Dropped):  # found while reading (a file that would not open)
        raise payload
    if kind == "file":
        if job.format != "text":
            raise Dropped("wrong_type", "a plain text file cannot be a chat record")
        text = formats.decode_text_file(payload)
        if not text.strip():
            raise Dropped("empty", "blank file")
        return text
    record = formats.parse_json_line(payload) if kind == "line" else payload
    if not isinstance(record, dict):
        raise Dropped("not_an_object", f"got a {type(record).__name__}")
    if job.format == "text":
        return formats.text_of(record, job.text_field)
    return formats.messages_of(record, job.messages_field)


def tokenize_chunk(chunk: Chunk, job: TokenizeJob = None) -> ChunkResult:
    job = job or _JOB
    tokenizer = load_tokenizer(job.tokenizer_dir)
    positions, contents, drops = [], [], []
    for i, payload in enumerate(chunk.payloads):
        try:
            contents.append(_content(chunk.kind, payload, job))
            positions.append(i)
        except Dropped as d:
            drops.append((i, d.reason, d.detail))
    if job.format == "chat":
        texts = formats.render_chats(tokenizer, contents, job.inline_reasoning)
        for i, text in zip(list(positions), texts):
            if isinstance(text, Dropped):
                drops.append((i, text.reason, text.detail))
        positions = [i for i, t in zip(positions, texts) if not isinstance(t, Dropped)]
        contents = [t for t in texts if not isinstance(t, Dropped)]
    # Text documents get the tokenizer's own special tokens (e.g. a BOS); a chat rendering is used verbatim.
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers>=0.21)
    encodings = encode(contents, add_special_tokens=job.format == "text")
    flat, lengths = [], []
    for i, enc in zip(positions, encodings):
        ids = enc.ids
        if not ids:
            drops.append((i, "empty", "no tokens"))
            continue
        flat += ids
        flat.append(job.eod)
        lengths.append(len(ids) + 1)
    drops.sort()
    return ChunkResult(
        tokens=np.asarray(flat, dtype=job.dtype),
        lengths=np.asarray(lengths, dtype=np.int64),
        drops=[(chunk.location(i), reason, detail) for i, reason, detail in drops],
        read=len(chunk.payloads),
        nbytes=chunk.nbytes,
    )


def _init_worker(job: TokenizeJob) -> None:
    global _JOB
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _JOB = job
    load_tokenizer(job.tokenizer_dir)


def tokenize_stream(chunks: Iterable[Chunk], job: TokenizeJob, workers: int) -> Iterator[ChunkResult]:
    """Tokenize ``chunks`` with ``workers`` processes (0 = here), yielding results in input order."""
    if workers < 1:
        for chunk in chunks:
            yield tokenize_chunk(chunk, job)
        return
    # fork: workers inherit the loaded tokenizer and imports (seconds saved per worker); spawn elsewhere
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(tokenize_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
