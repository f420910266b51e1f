"""Where the data stage puts things; every consumer (training, importance) finds them through here.

    <data dir>/                       data.output_dir, default <run.root>/<run.name>/data
        tokenizer/                    the demo tokenizer (only when data.tokenizer is empty)
        demo/<source>.jsonl           generated demo sources
        <source>.bin / .idx           one megatron indexed dataset per source
        <source>.json                 that source's report and input fingerprint
        calibration.bin / .idx        the importance stage's calibration subset
        blend.json                    manifest: sources, tokenizer facts (eod, pad, vocab), counts
        report.json, dropped.tsv      the run's report and every dropped record (file:line, reason)
        cache/                        megatron's GPTDataset / BlendedDataset index cache
"""

from __future__ import annotations

import os

MANIFEST = "blend.json"
CALIBRATION = "calibration"


def data_dir(recipe) -> str:
    return recipe.data.output_dir or os.path.join(recipe.run.root, recipe.run.name, "data")


def tokenizer_dir(recipe) -> str:
    """The tokenizer every stage uses: data.tokenizer, or the demo tokenizer the data stage trains."""
    return recipe.data.tokenizer or os.path.join(data_dir(recipe), "tokenizer")


def demo_source_path(recipe, source) -> str:
    return os.path.join(data_dir(recipe), "demo", f"{source.name}.jsonl")


def source_path(recipe, source) -> str:
    """The input a source reads: its path, or the generated file of a demo source."""
    return demo_source_path(recipe, source) if source.demo else source.path


def prefix(recipe, name: str) -> str:
    """Path prefix of an indexed dataset (megatron appends .bin / .idx)."""
    return os.path.join(data_dir(recipe), name)


def cache_dir(recipe) -> str:
    return os.path.join(data_dir(recipe), "cache")
