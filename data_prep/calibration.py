"""The importance stage's calibration subset: whole training-split documents drawn from each source in
proportion to the blend weights, written as one more indexed dataset (``<data dir>/calibration``).

It holds ``data.calibration_samples * data.calibration_seq_length`` tokens (or all the training documents,
when there are fewer), drawn with ``run.seed``, so the importance scores do not move when the blend or the
training length changes. Documents come from each source's train split, the distribution being trained on.
"""

from __future__ import annotations

import math
import os

import numpy as np


def train_document_range(num_documents: int, split: str) -> range:
    """The documents megatron's builder puts in the train split (same rounding as its split matrix)."""
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    share = parse_and_normalize_split(split)[0]
    return range(0, int(round(share * float(num_documents))))


def write_calibration(recipe, prefixes: dict, out_prefix: str, dtype) -> dict:
    """Write the subset; ``prefixes`` maps source name -> indexed dataset prefix. Returns its counts."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    d = recipe.data
    target = d.calibration_samples * d.calibration_seq_length + 1  # +1: GPTDataset reads one extra token
    total_weight = sum(s.weight for s in d.sources)
    rng = np.random.RandomState(recipe.run.seed)
    builder = IndexedDatasetBuilder(out_prefix + ".tmp.bin", dtype=dtype)
    documents = tokens = 0
    for src in d.sources:
        ds = IndexedDataset(prefixes[src.name])
        want = math.ceil(target * src.weight / total_weight)
        got = 0
        for i in rng.permutation(len(train_document_range(len(ds), d.split))):
            if got >= want:
                break
            doc = ds[int(i)]
            builder.add_document(doc, [doc.size])
            got += doc.size
            documents += 1
        tokens += got
    builder.finalize(out_prefix + ".tmp.idx")
    os.replace(out_prefix + ".tmp.bin", out_prefix + ".bin")
    os.replace(out_prefix + ".tmp.idx", out_prefix + ".idx")
    return {"documents": documents, "tokens": tokens, "target_tokens": target}
