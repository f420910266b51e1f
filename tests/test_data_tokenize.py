"""Data stage: a mixed text + chat corpus reads back as exactly the expected token ids (chat template
included), every input format gives the same documents, the output does not depend on the worker count,
and a blend honours its weights."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import TINY
from data_prep import demo_corpus, demo_tokenizer
from data_prep.build import prepare
from data_prep.loading import build_dataset
from data_prep.tokenize import load_tokenizer
from pipeline.config.load import build_recipe, read_yaml
from pipeline.config.validate import validate

TEXTS = ["Hello world.", "Problem: 2 + 2\nAnswer: 4\n", "  spaces  and\ttabs\n", "unicode: naïve café — ok"]
CHATS = [
    [{"role": "user", "content": "What is 3 + 4?"},
     {"role": "assistant", "reasoning_content": "3 + 4 = 7.", "content": "The answer is 7."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort [2, 1]."},
     {"role": "assistant", "content": "<think>\n1 < 2\n</think>\n[1, 2]"},  # a trace already inline
     {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}],
]
# What the demo chat template must render for CHATS (written out by hand, not by the template).
RENDERED = [
    "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n3 + 4 = 7.\n</think>\nThe answer is 7.<|im_end|>\n",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSort [2, 1].<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n1 < 2\n</think>\n[1, 2]<|im_end|>\n"
    "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\nYou are welcome.<|im_end|>\n",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    paths = []
    for fmt in ("chat", "text"):
        paths.append(str(root / f"{fmt}.jsonl"))
        demo_corpus.write_jsonl(paths[-1], fmt, 300, seed=len(paths))
    out = str(root / "tokenizer")
    paths.append(_write_jsonl(root / "extra.jsonl", [{"text": t} for t in TEXTS]))
    demo_tokenizer.train_demo_tokenizer(out, paths, 512, meta={})
    return out


def _write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def make_recipe(tmp_path, sources, tokenizer, **data):
    raw = read_yaml(TINY)
    raw["run"].update(root=str(tmp_path), name="t", seed=7)
    raw["data"].update(tokenizer=tokenizer, sources=sources, calibration_samples=2, calibration_seq_length=16,
                       **data)
    recipe = build_recipe(raw)
    validate(recipe)
    return recipe


def read_docs(recipe, name):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(os.path.join(recipe.run.root, "t", "data", name))
    return [ds[i].tolist() for i in range(len(ds))]


def test_demo_tokenizer_fits_the_tiny_model_and_renders_think(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert len(tok) == 512  # special and think tokens included: fits model.vocab_size = 512
    for messages, expected in zip(CHATS, RENDERED):
        assert tok.apply_chat_template(messages, tokenize=False) == expected
    think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert think == tok("<think></think>", add_special_tokens=False).input_ids  # one token each


def test_mixed_corpus_reads_back_exact_token_ids(tmp_path, tokenizer_dir):
    text_path = _write_jsonl(tmp_path / "text.jsonl", [{"body": t, "id": i} for i, t in enumerate(TEXTS)])
    chat_path = _write_jsonl(tmp_path / "chat.jsonl", [{"conv": m} for m in CHATS])
    sources = [{"name": "txt", "path": text_path, "format": "text", "text_field": "body"},
               {"name": "chat", "path": chat_path, "format": "chat", "messages_field": "conv"}]
    recipe = make_recipe(tmp_path / "w2", sources, tokenizer_dir, num_workers=2)
    report = prepare(recipe, progress=False)
    tok = load_tokenizer(tokenizer_dir)
    eod = tok.convert_tokens_to_ids("<|endoftext|>")
    assert read_docs(recipe, "txt") == [tok(t).input_ids + [eod] for t in TEXTS]
    chat_docs = read_docs(recipe, "chat")
    assert chat_docs == [tok(r, add_special_tokens=False).input_ids + [eod] for r in RENDERED]
    assert [tok.decode(d) for d in chat_docs] == [r + "<|endoftext|>" for r in RENDERED]
    by_name = {s.name: s for s in report.sources}
    assert (by_name["txt"].read, by_name["txt"].written, by_name["chat"].written) == (4, 4, 2)
    assert by_name["chat"].tokens == sum(map(len, chat_docs))

    # the same corpus tokenized in the main process gives byte-identical datasets
    recipe0 = make_recipe(tmp_path / "w0", sources, tokenizer_dir, num_workers=0)
    prepare(recipe0, progress=False)
    for name in ("txt.bin", "txt.idx", "chat.bin", "chat.idx"):
        a = open(os.path.join(tmp_path, "w2", "t", "data", name), "rb").read()
        assert a == open(os.path.join(tmp_path, "w0", "t", "data", name), "rb").read(), name


def test_every_input_format_gives_the_same_documents(tmp_path, tokenizer_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"text": t} for t in TEXTS]
    table = pa.Table.from_pylist(records)
    paths = {"jsonl": _write_jsonl(tmp_path / "a.jsonl", records), "parquet": str(tmp_path / "a.parquet"),
             "arrow": str(tmp_path / "a.arrow"), "arrow_stream": str(tmp_path / "s.arrow"),
             "json": str(tmp_path / "a.json"), "textdir": str(tmp_path / "texts"),
             "hf": str(tmp_path / "hf"), "hfdict": str(tmp_path / "hfdict")}
    pq.write_table(table, paths["parquet"])
    with pa.ipc.new_file(paths["arrow"], table.schema) as w:
        w.write_table(table)
    with pa.ipc.new_stream(paths["arrow_stream"], table.schema) as w:
        w.write_table(table)
    json.dump(records, open(paths["json"], "w"), indent=2)
    os.makedirs(paths["textdir"] + "/sub")
    for i, t in enumerate(TEXTS):  # walked in sorted order: 0.txt, 1.txt, sub/2.txt, sub/3.txt
        open(os.path.join(paths["textdir"], "sub" if i > 1 else "", f"{i}.txt"), "w").write(t)
    datasets.Dataset.from_list(records).save_to_disk(paths["hf"])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                          "test": datasets.Dataset.from_list(records[:1])}).save_to_disk(paths["hfdict"])
    sources = [{"name": k, "path": p, "format": "text"} for k, p in paths.items()]
    recipe = make_recipe(tmp_path, sources, tokenizer_dir, num_workers=0)
    report = prepare(recipe, progress=False)
    expected = read_docs(recipe, "jsonl")
    assert len(expected) == len(TEXTS)
    for name in paths:
        assert read_docs(recipe, name) == expected, name
    assert all(s.read == s.written == len(TEXTS) for s in report.sources)


def test_blend_honours_its_weights(tmp_path, tokenizer_dir):
    # source A only says "alpha", source B only "beta": a sample's letters reveal its source
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": " ".join(["alpha"] * (5 + i % 7))} for i in range(400)])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"text": " ".join(["beta"] * (5 + i % 5))} for i in range(400)])
    sources = [{"name": "a", "path": a, "weight": 3.0}, {"name": "b", "path": b, "weight": 1.0}]
    recipe = make_recipe(tmp_path, sources, tokenizer_dir, num_workers=0, split="90,5,5")
    prepare(recipe, progress=False)
    tok = load_tokenizer(tokenizer_dir)
    n = 400
    dataset = build_dataset(recipe, "train", seq_length=16, num_samples=n, seed=11)
    ids = np.array([int(dataset[i]["dataset_id"]) for i in range(n)])
    assert abs((ids == 0).sum() - 0.75 * n) <= 1 and abs((ids == 1).sum() - 0.25 * n) <= 1
    for i in range(0, n, 7):
        letters = set(tok.decode(dataset[i]["tokens"].tolist()).replace("<|endoftext|>", "")) - {" "}
        assert letters and letters <= set("alpha" if ids[i] == 0 else "beta"), (i, letters)
    # the weights act at load time: changing them needs no re-tokenization
    recipe.data.sources[1].weight = 3.0
    dataset = build_dataset(recipe, "train", seq_length=16, num_samples=n, seed=11)
    ids = np.array([int(dataset[i]["dataset_id"]) for i in range(n)])
    assert abs((ids == 0).sum() - n / 2) <= 1


def test_reasoning_is_inlined_for_templates_that_ignore_it_and_template_errors_are_dropped(tmp_path,
                                                                                            tokenizer_dir):
    # a plain ChatML template: no reasoning_content, and it rejects an unknown role
    plain = str(tmp_path / "plain_tokenizer")
    shutil.copytree(tokenizer_dir, plain)
    with open(os.path.join(plain, "chat_template.jinja"), "w") as f:
        f.write("{%- for m in messages %}{%- if m['role'] == 'robot' %}{{ raise_exception('no robots') }}"
                "{%- endif %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{%- endfor %}")
    robot = [{"role": "robot", "content": "beep"}]
    chat_path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in [CHATS[0], robot, CHATS[1]]])
    recipe = make_recipe(tmp_path, [{"name": "chat", "path": chat_path, "format": "chat"}], plain, num_workers=0)
    (src,) = prepare(recipe, progress=False).sources
    assert src.notes and "inlined" in src.notes[0]
    assert src.dropped == {"template_error": 1}
    assert src.examples["template_error"][0].startswith(f"{chat_path}:2: ")
    tok = load_tokenizer(plain)
    eod = tok.convert_tokens_to_ids("<|endoftext|>")
    # the trace lands in <think> ... </think> exactly as the reasoning-aware demo template renders it
    assert read_docs(recipe, "chat") == [tok(r, add_special_tokens=False).input_ids + [eod] for r in RENDERED]
