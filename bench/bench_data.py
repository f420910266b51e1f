"""Throughput of the data stage: tokens/s on a generated reasoning corpus with the demo tokenizer.

    python bench/bench_data.py                      # >= 50 MB corpus, 2 workers
    python bench/bench_data.py --mb 200 --workers 8

Generates the demo corpus (chat + text halves) until it holds ``--mb`` MB, trains the demo BPE on a slice
of it, then times ``data_prep.build.prepare`` (read, parse, render chat, tokenize, write .bin/.idx) and
prints one line per source and a summary: tokens/s of wall-clock time, MB/s, and CPU seconds used (main
process + workers), with the load average, since other work on the machine slows the wall-clock figure.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import demo_corpus, demo_tokenizer  # noqa: E402
from data_prep.build import prepare  # noqa: E402
from pipeline.config.load import build_recipe, read_yaml  # noqa: E402
from pipeline.config.validate import validate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(path: str, fmt: str, megabytes: float, seed: int) -> int:
    """Write demo records of ``fmt`` until the file holds ``megabytes`` MB; returns the record count."""
    sample = os.path.join(os.path.dirname(path), f"sample.{fmt}.jsonl")
    per_record = demo_corpus.write_jsonl(sample, fmt, 2000, seed) / 2000
    os.remove(sample)
    n = int(megabytes * 1e6 / per_record) + 1
    while demo_corpus.write_jsonl(path, fmt, n, seed) < megabytes * 1e6:
        n = int(n * 1.05) + 1
    return n


def cpu_seconds():
    """(main process, finished child processes) CPU seconds so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (half chat, half text)")
    ap.add_argument("--workers", type=int, default=2, help="tokenizer worker processes")
    ap.add_argument("--dir", default="", help="work directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="bench_data_")
    os.makedirs(work, exist_ok=True)
    try:
        t0 = time.perf_counter()
        paths = {fmt: os.path.join(work, f"{fmt}.jsonl") for fmt in ("chat", "text")}
        records = {fmt: generate(p, fmt, args.mb / 2, seed=i) for i, (fmt, p) in enumerate(paths.items())}
        tok_corpus = os.path.join(work, "tok.jsonl")
        demo_corpus.write_jsonl(tok_corpus, "chat", 20000, seed=99)
        tok_dir = os.path.join(work, "tokenizer")
        demo_tokenizer.train_demo_tokenizer(tok_dir, [tok_corpus], 512, meta={})
        size = sum(os.path.getsize(p) for p in paths.values())
        print(f"corpus: {size / 1e6:.1f} MB, {sum(records.values()):,} records ({time.perf_counter() - t0:.1f} s "
              f"to generate + train the tokenizer)")

        raw = read_yaml(os.path.join(ROOT, "recipes", "tiny.yaml"))
        raw["run"].update(root=os.path.join(work, "runs"), name="bench")
        raw["data"].update(tokenizer=tok_dir, num_workers=args.workers, calibration_samples=0, sources=[
            {"name": "chat", "path": paths["chat"], "format": "chat"},
            {"name": "text", "path": paths["text"], "format": "text"}])
        recipe = build_recipe(raw)
        validate(recipe)
        from data_prep.tokenize import load_tokenizer

        load_tokenizer(tok_dir)  # loaded before timing (once per process; workers inherit it)
        import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost is not throughput)

        cpu0, t0 = cpu_seconds(), time.perf_counter()
        report = prepare(recipe, progress=False)
        wall = time.perf_counter() - t0
        main_cpu, worker_cpu = (b - a for a, b in zip(cpu0, cpu_seconds()))
        cpu = main_cpu + worker_cpu
        print(report.format())
        tokens = sum(s.tokens for s in report.sources)
        cores = len(os.sched_getaffinity(0))
        print(f"RESULT data stage: {size / 1e6:.1f} MB, {tokens:,} tokens in {wall:.1f} s = {tokens / wall:,.0f} "
              f"tokens/s ({size / 1e6 / wall:.2f} MB/s) with {args.workers} workers on {cores} cores; "
              f"{cpu:.1f} CPU s (main {main_cpu:.1f}, workers {worker_cpu:.1f}) = {tokens / cpu:,.0f} tokens per "
              f"CPU-second; "
              f"load average {os.getloadavg()[0]:.1f}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
