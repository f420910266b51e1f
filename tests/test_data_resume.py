"""Loading for training: train_batches resumed from consumed_samples continues exactly where a straight run
would be (for any DP layout), the order is a function of the recipe alone, and the demo data stage is
reproducible and reusable."""

import itertools
import os
import shutil

import pytest
import torch

from conftest import TINY
from data_prep.build import prepare
from data_prep.loading import build_dataset, calibration_batches, stage_seed, train_batches, valid_batches
from pipeline.config import load_recipe

MBS, DP = 2, 2


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    r = load_recipe(TINY, [f"run.root={root}", "data.demo_corpus.records=300", "training.seq_length=32",
                           "training.train_iters=6", "training.global_batch_size=8", "training.eval_iters=2",
                           "data.calibration_samples=8", "data.calibration_seq_length=32"])
    prepare(r, progress=False)
    return r


def take(it, n):
    return list(itertools.islice(it, n))


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_resume_sees_the_same_samples_as_a_straight_run(recipe):
    k, m = 5, 9  # 14 global micro-batches of 4 > train_iters * gbs = 48 samples: the order wraps too
    straight = [take(train_batches(recipe, "pretrain", 0, MBS, r, DP), k + m) for r in range(DP)]
    resumed = [take(train_batches(recipe, "pretrain", k * MBS * DP, MBS, r, DP), m) for r in range(DP)]
    for r in range(DP):
        assert_same(straight[r][k:], resumed[r])
    # ranks hold disjoint slices of one global order, the same as a single rank with mbs * dp
    single = take(train_batches(recipe, "pretrain", 0, MBS * DP, 0, 1), k + m)
    for i in range(k + m):
        for key in single[i]:
            assert torch.equal(torch.cat([straight[0][i][key], straight[1][i][key]]), single[i][key])
    # a resumed run may change its DP size and still continue the same order
    regrouped = take(train_batches(recipe, "pretrain", k * MBS * DP, MBS * DP, 0, 1), m)
    assert_same(single[k:], regrouped)
    assert not torch.equal(straight[0][0]["tokens"], straight[1][0]["tokens"])


def test_samples_are_shifted_tokens_of_the_stage_length(recipe):
    (batch,) = take(train_batches(recipe, "pretrain", 0, MBS, 0, 1), 1)
    assert batch["tokens"].shape == (MBS, recipe.pretrain.training.seq_length)
    assert batch["tokens"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["position_ids"][0], torch.arange(recipe.pretrain.training.seq_length))


def test_order_depends_only_on_the_recipe(recipe):
    first = take(train_batches(recipe, "pretrain", 0, MBS, 0, 1), 6)
    shutil.rmtree(os.path.join(recipe.run.root, "tiny", "data", "cache"))  # rebuilt from scratch: same order
    assert_same(first, take(train_batches(recipe, "pretrain", 0, MBS, 0, 1), 6))
    recipe.run.seed += 1
    try:
        other = take(train_batches(recipe, "pretrain", 0, MBS, 0, 1), 6)
    finally:
        recipe.run.seed -= 1
    assert not all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))
    assert stage_seed(recipe, "pretrain") != stage_seed(recipe, "stage2")


def test_valid_batches_are_finite_and_repeatable(recipe):
    t = recipe.pretrain.training
    runs = [[list(valid_batches(recipe, "pretrain", MBS, r, DP)) for r in range(DP)] for _ in range(2)]
    assert len(runs[0][0]) == t.eval_iters * t.global_batch_size // (MBS * DP)
    for r in range(DP):
        assert_same(runs[0][r], runs[1][r])
    train = take(train_batches(recipe, "pretrain", 0, MBS, 0, 1), 1)[0]["tokens"]
    assert not any(torch.equal(v["tokens"], train) for v in runs[0][0])


def test_calibration_comes_from_train_documents_by_weight(recipe):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = os.path.join(recipe.run.root, "tiny", "data")
    batches = list(calibration_batches(recipe, 8, 32, 3))
    assert [b["tokens"].shape for b in batches] == [(3, 32), (3, 32), (2, 32)]
    calib = IndexedDataset(os.path.join(data, "calibration"))
    train_docs, longest = {}, {}
    for src in recipe.data.sources:
        ds = IndexedDataset(os.path.join(data, src.name))
        n_train = int(round(0.98 * len(ds)))  # data.split = 98,1,1
        train_docs.update({tuple(ds[i].tolist()): src.name for i in range(n_train)})
        longest[src.name] = int(ds.sequence_lengths.max())
    tokens = {s.name: 0 for s in recipe.data.sources}
    for i in range(len(calib)):
        doc = tuple(calib[i].tolist())
        tokens[train_docs[doc]] += len(doc)  # KeyError = not a training document
    target = 8 * 32 + 1
    for src in recipe.data.sources:  # each source's share reaches its weight with less than one doc to spare
        assert target * src.weight <= tokens[src.name] < target * src.weight + longest[src.name]


def test_rerun_reuses_up_to_date_sources(recipe):
    data = os.path.join(recipe.run.root, "tiny", "data")
    before = {n: open(os.path.join(data, n), "rb").read() for n in ("reasoning_chat.bin", "reasoning_text.idx")}
    report = prepare(recipe, progress=False)
    assert all(s.reused for s in report.sources)
    report = prepare(recipe, force=True, progress=False)
    assert not any(s.reused for s in report.sources)
    for name, blob in before.items():
        assert open(os.path.join(data, name), "rb").read() == blob  # deterministic corpus, tokenizer, output
    dataset = build_dataset(recipe, "train", 32, 10, seed=1)
    assert len(dataset) >= 10


def test_loading_without_matching_prepared_data_is_a_user_error(recipe, tmp_path):
    from pipeline.errors import UserError

    other = load_recipe(TINY, [f"run.root={tmp_path}"])
    with pytest.raises(UserError, match=r"no prepared data at .*blend.json: run `python -m pipeline data"):
        train_batches(other, "pretrain", 0, MBS, 0, 1)
    tokenizer_dir = os.path.join(recipe.run.root, "tiny", "data", "tokenizer")
    recipe.data.tokenizer = tokenizer_dir  # the same files, but not what the data stage was run with
    try:
        with pytest.raises(UserError, match="was tokenized with data.tokenizer = '', the recipe says"):
            train_batches(recipe, "pretrain", 0, MBS, 0, 1)
    finally:
        recipe.data.tokenizer = ""
