"""The data stage as a library call: sources -> one megatron indexed dataset each, a calibration subset and
a manifest (``blend.json``) that the loaders read. See docs/data.md.

Re-running is cheap: a source whose inputs, settings and tokenizer are unchanged is reused (``force``
rebuilds). Outputs are written under temporary names and renamed when complete, so an interrupted run never
leaves a dataset that looks finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np

from data_prep import demo_corpus, demo_tokenizer, formats, layout
from data_prep.calibration import write_calibration
from data_prep.readers import input_files, iter_chunks, total_bytes
from data_prep.report import Report, SourceReport
from data_prep.tokenize import TokenizeJob, load_tokenizer, tokenize_stream
from pipeline.errors import UserError

MANIFEST_VERSION = 1


def prepare(recipe, strict: bool = False, force: bool = False, progress: bool = True) -> Report:
    """Run the whole data stage for ``recipe``; returns the report (also saved as report.json)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from data.num_workers
    d = recipe.data
    if not d.sources:
        raise UserError("data.sources is empty: list at least one source (see docs/data.md)")
    out = layout.data_dir(recipe)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    ensure_demo_corpus(recipe)
    tok_dir = ensure_tokenizer(recipe)
    info = tokenizer_facts(recipe, tok_dir)
    report = Report(tokenizer=tok_dir, workers=d.num_workers)
    for i, src in enumerate(d.sources):
        report.sources.append(build_source(recipe, i, src, info, strict, force, progress))
    prefixes = {s.name: layout.prefix(recipe, s.name) for s in d.sources}
    calibration = None
    if d.calibration_samples:
        out_prefix = layout.prefix(recipe, layout.CALIBRATION)
        calibration = write_calibration(recipe, prefixes, out_prefix, np.dtype(info["dtype"]).type)
        report.calibration_tokens = calibration["tokens"]
    report.seconds = time.perf_counter() - t0
    manifest = {
        "version": MANIFEST_VERSION,
        **{k: info[k] for k in ("tokenizer", "vocab_size", "eod", "pad", "dtype")},
        "sources": {s.name: {"prefix": s.name, "documents": s.written, "tokens": s.tokens}
                    for s in report.sources},
        "calibration": calibration and {"prefix": layout.CALIBRATION, **calibration},
        "data_config": dataclasses.asdict(d),  # the recipe's data section this was built from
    }
    with open(os.path.join(out, layout.MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    report.save(os.path.join(out, "report.json"))
    return report


def ensure_demo_corpus(recipe) -> None:
    """Generate every demo source's jsonl unless it already holds what data.demo_corpus asks for."""
    for src in recipe.data.sources:
        if not src.demo:
            continue
        path = layout.demo_source_path(recipe, src)
        meta = _demo_meta(recipe, src)
        if _read_json(path + ".meta") == meta and os.path.isfile(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        demo_corpus.write_jsonl(path + ".tmp", src.format, meta["records"], meta["seed"])
        os.replace(path + ".tmp", path)
        _write_json(path + ".meta", meta)


def _demo_meta(recipe, src) -> dict:
    c = recipe.data.demo_corpus
    return {"format": src.format, "records": c.records, "seed": demo_corpus.source_seed(c.seed, src.name)}


def ensure_tokenizer(recipe) -> str:
    """data.tokenizer, or the demo BPE trained on the demo sources (retrained when the corpus changes)."""
    tok_dir = layout.tokenizer_dir(recipe)
    if recipe.data.tokenizer:
        return tok_dir
    demo = [s for s in recipe.data.sources if s.demo]
    if not demo:
        raise UserError("data.tokenizer is empty and no source is a demo source: set data.tokenizer to a HF "
                        "tokenizer directory (e.g. the Nano v3 tokenizer)")
    meta = {"vocab_size": recipe.data.demo_corpus.vocab_size,
            "corpus": {s.name: _demo_meta(recipe, s) for s in demo}}
    if not demo_tokenizer.is_current(tok_dir, meta):
        paths = [layout.demo_source_path(recipe, s) for s in demo]
        demo_tokenizer.train_demo_tokenizer(tok_dir, paths, recipe.data.demo_corpus.vocab_size, meta)
    return tok_dir


def tokenizer_facts(recipe, tok_dir: str) -> dict:
    """Vocabulary size, EOD and pad ids, token dtype and a content hash of the tokenizer at ``tok_dir``."""
    from megatron.core.datasets.indexed_dataset import DType

    from pipeline.hf.files import load_tokenizer_dir

    try:
        tok = load_tokenizer(tok_dir)
    except Exception:  # broken tokenizer files: one line naming the file
        load_tokenizer_dir(tok_dir, "data.tokenizer")
        raise
    vocab = len(tok)
    if vocab > recipe.model.vocab_size:
        raise UserError(f"the tokenizer at {tok_dir} has {vocab} tokens but model.vocab_size = "
                        f"{recipe.model.vocab_size}")
    if recipe.data.eod_token:
        eod = tok.convert_tokens_to_ids(recipe.data.eod_token)
        if eod is None or eod == tok.unk_token_id:
            raise UserError(f"data.eod_token = {recipe.data.eod_token!r} is not a token of {tok_dir}")
    else:
        eod = tok.eos_token_id
        if eod is None:
            raise UserError(f"the tokenizer at {tok_dir} has no eos token: set data.eod_token")
    digest = hashlib.sha256()
    for name in sorted(os.listdir(tok_dir)):
        if os.path.isfile(os.path.join(tok_dir, name)):
            with open(os.path.join(tok_dir, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return {"tokenizer": os.path.abspath(tok_dir), "vocab_size": vocab, "eod": int(eod),
            "pad": tok.pad_token_id, "dtype": DType.optimal_dtype(vocab).__name__, "hash": digest.hexdigest()}


def build_source(recipe, index: int, src, info: dict, strict: bool, force: bool, progress: bool) -> SourceReport:
    """Tokenize one source into ``<data dir>/<name>.bin/.idx`` (or reuse it when up to date)."""
    from tqdm import tqdm

    path = layout.source_path(recipe, src)
    prefix = layout.prefix(recipe, src.name)
    fingerprint = _fingerprint(src, path, info)
    previous = _read_json(prefix + ".json")
    if not force and previous and previous.get("fingerprint") == fingerprint and all(
            os.path.isfile(prefix + ext) for ext in (".bin", ".idx")):
        return dataclasses.replace(SourceReport.from_dict(previous["report"]), reused=True, seconds=0.0)

    tok = load_tokenizer(info["tokenizer"])
    inline = False
    if src.format == "chat":
        if not getattr(tok, "chat_template", None):
            raise UserError(f"data.sources[{index}] ({src.name}) is format chat but the tokenizer at "
                            f"{info['tokenizer']} has no chat template")
        try:
            inline = not formats.template_renders_reasoning(tok)
        except Exception as e:  # a chat template that does not compile or render (jinja errors)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{info['tokenizer']}: the tokenizer's chat template fails on a plain two-turn chat "
                            f"({type(e).__name__}: {first[:200]}) [data.sources[{index}] ({src.name}) is format chat]"
                            ) from None
    rep = SourceReport(name=src.name, path=path, format=src.format)
    if inline:
        rep.notes.append("the chat template ignores reasoning_content: inlined as <think>...</think>")
    job = TokenizeJob(info["tokenizer"], src.format, src.text_field, src.messages_field, inline, info["eod"],
                      info["dtype"])
    t0 = time.perf_counter()
    bar = tqdm(total=total_bytes(path), unit="B", unit_scale=True, desc=f"data {src.name}", disable=not progress)
    try:
        _write(prefix, tokenize_stream(iter_chunks(path, src.hf_split), job, recipe.data.num_workers), rep,
               strict, info["dtype"], bar)
    finally:
        bar.close()
    rep.seconds = time.perf_counter() - t0
    if rep.written == 0:
        reasons = ", ".join(f"{r} x {n}" for r, n in rep.dropped.items())
        example = next(iter(rep.examples.values()), [""])[0]
        if not rep.read:  # an empty file or directory: name it
            raise UserError(f"data.sources[{index}] ({src.name}): {path} holds no records")
        raise UserError(f"data.sources[{index}] ({src.name}): none of {rep.read} records could be used "
                        f"({reasons or 'no input'}); e.g. {example}")
    _write_json(prefix + ".json", {"fingerprint": fingerprint, "report": rep.to_dict()})
    return rep


def _write(prefix: str, results, rep: SourceReport, strict: bool, dtype: str, bar) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tmp = prefix + ".tmp"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=np.dtype(dtype).type)
    try:
        with open(prefix + ".dropped.tsv", "w") as dropped:
            dropped.write("location\treason\tdetail\n")
            for res in results:
                for location, reason, detail in res.drops:
                    if strict:
                        raise UserError(f"{location}: {formats.DROP_REASONS[reason]} ({detail}) "
                                        f"[source {rep.name}; without --strict it is counted and skipped]")
                    rep.drop(location, reason, detail)
                    dropped.write(f"{location}\t{reason}\t{detail}\n")
                start = 0
                for n in res.lengths.tolist():
                    builder.add_document(res.tokens[start:start + n], [n])
                    start += n
                rep.read += res.read
                rep.written += len(res.lengths)
                rep.tokens += int(res.tokens.size)
                bar.update(res.nbytes)
        builder.finalize(tmp + ".idx")
    except BaseException:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
        raise
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")


def _fingerprint(src, path: str, info: dict) -> str:
    """Changes when the source's settings, its input files (size, mtime) or the tokenizer change."""
    files = [(os.path.relpath(f, path) if f != path else "", os.path.getsize(f), os.stat(f).st_mtime_ns)
             for f in input_files(path)]
    settings = {k: v for k, v in dataclasses.asdict(src).items() if k != "weight"}  # weights act at load time
    key = {"source": settings, "files": files, "tokenizer": info["hash"], "eod": info["eod"],
           "dtype": info["dtype"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def plan(recipe) -> str:
    """What ``prepare`` would read and write (for --dry-run); touches nothing."""
    d = recipe.data
    total = sum(s.weight for s in d.sources) or 1.0
    demo_tok = f"{layout.tokenizer_dir(recipe)} (demo BPE, {d.demo_corpus.vocab_size} tokens, trained here)"
    tok = d.tokenizer or demo_tok
    lines = [f"# data stage: {len(d.sources)} source(s) -> {layout.data_dir(recipe)}", f"# tokenizer: {tok}"]
    for s in d.sources:
        where = (f"{layout.source_path(recipe, s)} (demo, {d.demo_corpus.records} records, generated here)"
                 if s.demo else s.path)
        lines.append(f"#   {s.name:<16} {s.format:<5} weight {s.weight / total:.3f}  {where}")
    lines.append(f"# split {d.split}; calibration subset {d.calibration_samples} x {d.calibration_seq_length} "
                 f"tokens; {d.num_workers} worker(s)")
    return "\n".join(lines)
