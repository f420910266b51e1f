"""Packed sequences (``training.document_attention_mask``): several documents per training sequence.

The data path (megatron's GPTDataset with reset_attention_mask): a batch carries a block-causal attention mask
with no query attending across an end-of-document token. Through the model (local backend): with that mask,
the logits of a later document do not depend on the tokens of an earlier one when the layers are attention and
MoE; without the mask they do (the check is informative); with a Mamba layer they do even with the mask -- the
Mamba state and conv cross document boundaries (the stated limit, docs/context_parallel.md).
"""

import pytest
import torch

from conftest import TINY
from data_prep.build import prepare
from data_prep.loading import read_manifest, train_batches
from pipeline import parallel
from pipeline.config import load_recipe
from pipeline.model.build import build_model

SEQ = 64


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    r = load_recipe(TINY, [f"run.root={root}", "data.demo_corpus.records=300", f"training.seq_length={SEQ}",
                           "training.train_iters=6", "training.global_batch_size=8", "training.data=blend",
                           "training.document_attention_mask=true", "data.calibration_samples=8",
                           "data.calibration_seq_length=32"])
    prepare(r, progress=False)
    eod = read_manifest(r)["eod"]
    batch = next(train_batches(r, "pretrain", 0, 8, 0, 1))
    ends = [(row == eod).nonzero()[:, 0] for row in batch["tokens"]]
    rows = [i for i, e in enumerate(ends) if len(e) and 8 < int(e[0]) < SEQ - 8]
    assert rows, "no sequence with a document boundary inside"
    return r, eod, {k: v[rows[:1]] for k, v in batch.items()}


def test_batch_mask_blocks_attention_across_documents(packed):
    _, eod, batch = packed
    tokens, mask = batch["tokens"][0], batch["attention_mask"][0, 0]  # True = masked (megatron's convention)
    ends = (tokens == eod).nonzero()[:, 0].tolist()
    doc = torch.zeros(SEQ, dtype=torch.long)
    for e in ends:
        doc[e + 1:] += 1
    allowed = (doc[:, None] == doc[None, :]) & torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))
    assert torch.equal(~mask, allowed)
    assert batch["position_ids"][0, ends[0] + 1] == 0  # positions restart with each document


def logits(r, pattern, tokens, position_ids, mask):
    r = load_recipe(TINY, [f"model.pattern={pattern}", f"model.num_layers={len(pattern)}",
                           f"training.seq_length={SEQ}", "model.backend=local"])
    parallel.initialize(r)
    torch.manual_seed(0)
    model = build_model(r).eval()
    with torch.no_grad():
        return model(tokens, position_ids, mask)


@pytest.mark.parametrize("pattern, masked, crosses", [("*E*E", True, False), ("*E*E", False, True),
                                                      ("M*E", True, True)])
def test_what_crosses_a_document_boundary(packed, pattern, masked, crosses):
    r, eod, batch = packed
    tokens = batch["tokens"]
    first_end = int((tokens[0] == eod).nonzero()[0, 0])
    altered = tokens.clone()
    altered[0, :first_end] = (altered[0, :first_end] + 7) % 300  # another first document, same boundary
    mask = batch["attention_mask"] if masked else None
    a = logits(r, pattern, tokens, batch["position_ids"], mask)
    b = logits(r, pattern, altered, batch["position_ids"], mask)
    later = (a[0, first_end + 1:] - b[0, first_end + 1:]).abs().max().item()
    assert (a[0, :first_end] - b[0, :first_end]).abs().max() > 1e-3  # the first document did change
    if crosses:
        assert later > 1e-4, f"{pattern}: the later document should see the earlier one"
    else:
        # not bit-exact: the altered first document routes its tokens to other experts, so each expert's GEMM
        # sees other row counts, and multithreaded BLAS rounds the later tokens' rows differently (3e-7 on 2
        # threads; 0 with attention alone). A real leak moves them by as much as the first document moved (> 1e-3).
        assert later <= 1e-5, f"{pattern}: attention crossed a document boundary ({later:.1e})"
