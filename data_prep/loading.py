"""Training-time data: megatron-core GPTDataset / BlendedMegatronDatasetBuilder over the data stage's output.

The global sample order is a pure function of the recipe (sources, weights, split, seed) and the stage (its
seq_length, train_iters * global_batch_size, and a per-stage seed), so a run resumed from a checkpointed
``consumed_samples`` continues exactly where a straight run would be, whatever its data-parallel size.
Global micro-batch m holds samples [c + m*mbs*dp, c + (m+1)*mbs*dp) (c = consumed_samples); DP rank r takes
its ``mbs`` slice at offset r*mbs. Past train_iters * global_batch_size samples the order wraps around.

Call these on every rank: with torch.distributed initialized, rank 0 builds the index cache
(``<data dir>/cache``) first and the others wait at a barrier, then load it.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Dict, Iterator, List

import torch

from data_prep import layout
from pipeline.errors import UserError

SPLITS = ("train", "valid", "test")
KEYS = ("tokens", "labels", "loss_mask", "position_ids")
log = logging.getLogger(__name__)


class IndexedTokenizer:
    """The tokenizer facts megatron's GPT datasets read (``.eod``, ``.pad``, ``.special_tokens_dict``,
    ``.unique_identifiers``, ``.vocab_size``), taken from the manifest so loading never loads the tokenizer."""

    def __init__(self, manifest: dict):
        self.vocab_size = manifest["vocab_size"]
        self.eod = self.eos = manifest["eod"]
        # no pad token: -1 never occurs in the data, so megatron masks nothing by mistake
        self.pad = manifest["pad"] if manifest["pad"] is not None else -1
        self.special_tokens_dict = {"eos_token": self.eod, "pad_token": self.pad}
        self.unique_identifiers = {"class": type(self).__name__, "tokenizer": manifest["tokenizer"],
                                   "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}


def read_manifest(recipe) -> dict:
    path = os.path.join(layout.data_dir(recipe), layout.MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"no prepared data at {path}: run `python -m pipeline data --recipe <recipe>` first, "
                        "or use training.data=synthetic")
    from pipeline.hf.files import read_json

    manifest = read_json(path, "data manifest")
    if not all(k in manifest for k in ("sources", "data_config", "vocab_size")):
        raise UserError(f"{path}: not a data manifest (re-run the data stage)")
    for i, src in enumerate(recipe.data.sources):
        if src.name not in manifest["sources"]:
            raise UserError(f"data.sources[{i}] ({src.name}) is not in {path}: re-run the data stage")
    built_with = manifest["data_config"]["tokenizer"]
    if built_with != recipe.data.tokenizer:
        raise UserError(f"{path} was tokenized with data.tokenizer = {built_with!r}, the recipe says "
                        f"{recipe.data.tokenizer!r}: re-run the data stage")
    if manifest["vocab_size"] > recipe.model.vocab_size:
        raise UserError(f"{path}: the tokenizer has {manifest['vocab_size']} tokens but model.vocab_size = "
                        f"{recipe.model.vocab_size}")
    return manifest


def stage_seed(recipe, stage: str) -> int:
    """Each stage draws its own document order from run.seed (stage 2 does not replay stage 1's order)."""
    return (recipe.run.seed * 1_000_003 + zlib.crc32(stage.encode())) % 2**32


def build_dataset(recipe, split: str, seq_length: int, num_samples: int, seed: int, document_mask: bool = False):
    """The blended megatron dataset of ``split`` (train | valid | test) with at least ``num_samples`` samples
    of ``seq_length`` tokens; samples are dicts of tokens, labels, loss_mask, position_ids. ``document_mask``
    (``training.document_attention_mask``): megatron's block-causal ``attention_mask`` (no attention across an
    end-of-document token) and position ids restarting at every document."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    manifest = read_manifest(recipe)
    d = recipe.data
    which = SPLITS.index(split)
    prefixes = [os.path.join(layout.data_dir(recipe), manifest["sources"][s.name]["prefix"]) for s in d.sources]
    weights = [s.weight for s in d.sources] if len(d.sources) > 1 else None
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=d.split,
        path_to_cache=layout.cache_dir(recipe), tokenizer=IndexedTokenizer(manifest),
        reset_position_ids=document_mask, reset_attention_mask=document_mask, eod_mask_loss=False,
        create_attention_mask=document_mask,
    )
    config.split_matrix = [m if i == which else None for i, m in enumerate(config.split_matrix)]
    for src in d.sources:
        _check_split_not_empty(recipe, manifest, src.name, config.split_matrix[which], split)
    sizes = [num_samples if i == which else 0 for i in range(len(SPLITS))]
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return datasets[which]


def _check_split_not_empty(recipe, manifest: dict, name: str, bookends, split: str) -> None:
    n = manifest["sources"][name]["documents"]
    begin, end = int(round(bookends[0] * n)), int(round(bookends[1] * n))
    if end <= begin:
        raise UserError(f"data source {name} has {n} documents, none in its {split} split "
                        f"(data.split = {recipe.data.split!r}): add data or change data.split")


def _collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    keys = KEYS + (("attention_mask",) if "attention_mask" in samples[0] else ())  # training.document_attention_mask
    return {k: torch.stack([s[k] for s in samples]) for k in keys}


def _check_rank(micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad micro_batch_size={micro_batch_size} / dp_rank={dp_rank} / dp_size={dp_size}")


def train_batches(recipe, stage: str, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Infinite micro-batches of ``stage`` for one DP rank, starting after ``consumed_samples`` (global)."""
    _check_rank(micro_batch_size, dp_rank, dp_size)
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples = {consumed_samples} < 0")
    t = getattr(recipe, stage).training
    dataset = build_dataset(recipe, "train", t.seq_length, t.train_iters * t.global_batch_size,
                            stage_seed(recipe, stage), t.document_attention_mask)
    return _train_iter(dataset, consumed_samples, micro_batch_size, dp_rank, dp_size)


def _train_iter(dataset, consumed: int, mbs: int, dp_rank: int, dp_size: int):
    n = len(dataset)
    while True:
        start = consumed + dp_rank * mbs
        yield _collate([dataset[(start + k) % n] for k in range(mbs)])
        consumed += mbs * dp_size


def valid_batches(recipe, stage: str, micro_batch_size: int, dp_rank: int,
                  dp_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """The validation set of ``stage`` (eval_iters global batches), this rank's micro-batches, same every call."""
    _check_rank(micro_batch_size, dp_rank, dp_size)
    t = getattr(recipe, stage).training
    if t.global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"global_batch_size {t.global_batch_size} is not a multiple of "
                         f"micro_batch_size * dp_size = {micro_batch_size * dp_size}")
    total = t.eval_iters * t.global_batch_size
    if total == 0:
        return iter(())
    dataset = build_dataset(recipe, "valid", t.seq_length, total, stage_seed(recipe, stage), t.document_attention_mask)
    return _finite_iter(dataset, total, micro_batch_size, dp_rank, dp_size)


def _finite_iter(dataset, total: int, mbs: int, dp_rank: int, dp_size: int):
    for start in range(0, total, mbs * dp_size):
        yield _collate([dataset[start + dp_rank * mbs + k] for k in range(mbs)])


def calibration_batches(recipe, num_samples: int, seq_length: int,
                        micro_batch_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """``num_samples`` sequences of the calibration subset, in micro-batches (the last may be smaller)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    manifest = read_manifest(recipe)
    calib = manifest.get("calibration")
    if not calib:
        raise UserError("the data stage wrote no calibration subset (data.calibration_samples = 0): set it and "
                        "re-run `python -m pipeline data`")
    if num_samples * seq_length + 1 > calib["tokens"]:
        log.warning("calibration subset holds %d tokens, fewer than %d samples x %d: documents repeat "
                    "(raise data.calibration_samples / data.calibration_seq_length and re-run the data stage)",
                    calib["tokens"], num_samples, seq_length)
    config = GPTDatasetConfig(
        random_seed=recipe.run.seed, sequence_length=seq_length,
        blend=([os.path.join(layout.data_dir(recipe), calib["prefix"])], None), split="1,0,0",
        path_to_cache=layout.cache_dir(recipe), tokenizer=IndexedTokenizer(manifest),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
    )
    config.split_matrix = [(0.0, 1.0), None, None]
    dataset = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()[0]
    return _in_order(dataset, num_samples, micro_batch_size)


def _in_order(dataset, num_samples: int, mbs: int):
    for start in range(0, num_samples, mbs):
        yield _collate([dataset[i] for i in range(start, min(start + mbs, num_samples))])
