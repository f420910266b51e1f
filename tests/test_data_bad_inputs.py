"""Bad data: every malformed record is counted and reported with file:line, the counts add up
(read = written + dropped), and --strict stops at the first one with its line."""

import json
import os

import pytest
import yaml

from conftest import TINY
from data_prep import demo_corpus, demo_tokenizer
from data_prep.build import prepare
from pipeline.config.load import build_recipe, read_yaml
from pipeline.config.validate import validate
from pipeline.errors import UserError

GOOD_CHAT = {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a."}]}
# (raw line, expected drop reason or None when the line is good)
TEXT_LINES = [
    (b'{"text": "good one"}', None),
    (b'{"text": "unterminated', "malformed_json"),
    (b"[1, 2]", "not_an_object"),
    (b'{"txt": "wrong field name"}', "missing_field"),
    (b'{"text": ""}', "empty"),
    (b'{"text": 42}', "wrong_type"),
    (b'{"text": "caf\xe9 in latin-1"}', "not_utf8"),
    (b'{"text": "good two"}', None),
    (b"", "empty"),
    (b'{"text": "   \\n  "}', "empty"),
    (b'"just a string"', "not_an_object"),
    (b'{"text": null}', "wrong_type"),
    (b'{"text": "good three"}', None),
    (b'{"text": "x", }', "malformed_json"),
]
CHAT_LINES = [
    (json.dumps(GOOD_CHAT).encode(), None),
    (b'{"messages": []}', "empty"),
    (b'{"messages": "hi"}', "wrong_type"),
    (b'{"messages": [{"role": "user"}]}', "wrong_type"),
    (json.dumps({"conversation": GOOD_CHAT["messages"]}).encode(), "missing_field"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a", "reasoning_content": 5}]}).encode(),
     "wrong_type"),
    (json.dumps(GOOD_CHAT).encode(), None),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = str(root / "chat.jsonl")
    demo_corpus.write_jsonl(corpus, "chat", 200, seed=3)
    demo_tokenizer.train_demo_tokenizer(str(root / "tokenizer"), [corpus], 512, meta={})
    return str(root / "tokenizer")


@pytest.fixture
def bad_corpus(tmp_path):
    """Four sources holding 20 malformed records; returns (raw recipe, {location: reason})."""
    expected = {}
    paths = {}
    for name, lines in (("text", TEXT_LINES), ("chat", CHAT_LINES)):
        paths[name] = str(tmp_path / f"{name}.jsonl")
        with open(paths[name], "wb") as f:
            f.write(b"\n".join(line for line, _ in lines) + b"\n")
        expected.update({f"{paths[name]}:{i}": r for i, (_, r) in enumerate(lines, 1) if r})
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("a good text file")
    (docs / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    (docs / "c.txt").write_text("  \n")
    expected[str(docs / "b.txt")] = "not_utf8"
    expected[str(docs / "c.txt")] = "empty"
    (tmp_path / "arr").mkdir()
    arr = tmp_path / "arr" / "array.json"
    arr.write_text('[\n  {"text": "fine"},\n  {"text": "broken"\n]\n')
    expected[f"{arr}:4"] = "malformed_json"
    arr_ok = tmp_path / "arr" / "ok.json"
    arr_ok.write_text(json.dumps([{"text": "one"}, {"text": 3}, {"text": "three"}]))
    expected[f"{arr_ok}:2"] = "wrong_type"
    raw = read_yaml(TINY)
    raw["run"].update(root=str(tmp_path / "runs"), name="t")
    raw["data"].update(sources=[
        {"name": "text", "path": paths["text"]},
        {"name": "chat", "path": paths["chat"], "format": "chat"},
        {"name": "docs", "path": str(docs)},
        {"name": "arrays", "path": str(tmp_path / "arr")},
    ], calibration_samples=1, calibration_seq_length=4)
    return raw, expected


def _recipe(raw, tokenizer_dir):
    raw["data"]["tokenizer"] = tokenizer_dir
    recipe = build_recipe(raw)
    validate(recipe)
    return recipe


def test_every_malformed_record_is_reported_with_file_and_line(bad_corpus, tokenizer_dir):
    raw, expected = bad_corpus
    assert len(expected) >= 10
    recipe = _recipe(raw, tokenizer_dir)
    report = prepare(recipe, progress=False)
    data = os.path.join(recipe.run.root, "t", "data")
    reported = {}
    for src in report.sources:
        assert src.read == src.written + src.dropped_total, src.name
        with open(os.path.join(data, f"{src.name}.dropped.tsv")) as f:
            rows = [line.rstrip("\n").split("\t") for line in f][1:]
        assert len(rows) == src.dropped_total
        reported.update({loc: reason for loc, reason, _ in rows})
    assert reported == expected
    written = {s.name: s.written for s in report.sources}
    assert written == {"text": 3, "chat": 2, "docs": 1, "arrays": 2}
    saved = json.load(open(os.path.join(data, "report.json")))
    # 3 text files; the broken JSON array counts as one record read and dropped, the good one has 3
    read = len(TEXT_LINES) + len(CHAT_LINES) + 3 + 1 + 3
    assert saved["totals"]["read"] == read == saved["totals"]["written"] + saved["totals"]["dropped"]
    assert saved["totals"]["dropped"] == len(expected)
    printed = report.format()
    assert f"{raw['data']['sources'][0]['path']}:2: " in printed  # examples name file:line


def test_strict_stops_at_the_first_bad_record_with_its_line(bad_corpus, tokenizer_dir):
    raw, _ = bad_corpus
    recipe = _recipe(raw, tokenizer_dir)
    with pytest.raises(UserError) as e:
        prepare(recipe, strict=True, progress=False)
    text_path = raw["data"]["sources"][0]["path"]
    assert str(e.value).startswith(f"{text_path}:2: not valid JSON")
    assert not os.path.exists(os.path.join(recipe.run.root, "t", "data", "text.bin"))  # nothing half-written


def test_a_source_with_no_usable_record_is_an_error(tmp_path, tokenizer_dir):
    path = tmp_path / "x.jsonl"
    path.write_text('{"body": "a"}\n{"body": "b"}\n')
    raw = read_yaml(TINY)
    raw["run"].update(root=str(tmp_path), name="t")
    raw["data"].update(sources=[{"name": "x", "path": str(path)}])
    expected = r"none of 2 records could be used \(missing_field x 2\); e.g. .*x.jsonl:1"
    with pytest.raises(UserError, match=expected):
        prepare(_recipe(raw, tokenizer_dir), progress=False)


def test_cli_strict_prints_one_line_and_exits_2(bad_corpus, tokenizer_dir, tmp_path, capsys):
    from pipeline.cli import main

    raw, _ = bad_corpus
    raw["data"]["tokenizer"] = tokenizer_dir
    recipe_path = tmp_path / "bad.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as e:  # in-process: the same path as `python -m pipeline`, minus imports
        main(["data", "--recipe", str(recipe_path), "--strict", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    text_path = raw["data"]["sources"][0]["path"]
    assert len(err) == 1 and err[0].startswith(f"error: {text_path}:2: not valid JSON"), err
