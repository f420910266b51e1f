"""Malformed data files and tokenizers through ``python -m pipeline data --strict`` (in-process): exit 2, one line
naming the file (and line or row where there is one), no traceback, nothing written outside the run directory."""

import gzip
import json
import os

import pytest

from malformed import expect_user_error, tiny_raw, write_recipe
from data_prep import demo_corpus, demo_tokenizer

GOOD = b'{"text": "a good document"}\n'
CHAT_OK = {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a."}]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = str(root / "chat.jsonl")
    demo_corpus.write_jsonl(corpus, "chat", 200, seed=3)
    demo_tokenizer.train_demo_tokenizer(str(root / "tokenizer"), [corpus], 512, meta={})
    return str(root / "tokenizer")


def _gz(path, data):
    with gzip.open(path, "wb") as f:
        f.write(data)


def truncated_gz(d):
    p = d / "s.jsonl.gz"
    _gz(p, b"".join(b'{"text": "document %d"}\n' % i for i in range(100000)))  # ~2.4 MB: > 2 read chunks
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p, ["truncated or corrupt gzip"]


def corrupt_gz(d):
    p = d / "s.jsonl.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(64))
    return p, ["gzip"]


def not_gzip_at_all(d):
    p = d / "s.jsonl.gz"
    p.write_bytes(GOOD)
    return p, ["s.jsonl.gz:1", "truncated or corrupt gzip"]


def bad_json_in_gz(d):
    p = d / "s.jsonl.gz"
    _gz(p, GOOD + b'{"text": "unterminated\n')
    return p, ["s.jsonl.gz:2", "not valid JSON"]


def empty_jsonl(d):
    p = d / "s.jsonl"
    p.write_bytes(b"")
    return p, ["holds no records", "data.sources[0] (s)"]


def empty_gz(d):
    p = d / "s.jsonl.gz"
    _gz(p, b"")
    return p, ["holds no records"]


def zero_byte_gz(d):
    p = d / "s.jsonl.gz"
    p.write_bytes(b"")
    return p, ["holds no records"]


def gz_cut_in_header(d):
    p = d / "s.jsonl.gz"
    _gz(p, GOOD)
    p.write_bytes(p.read_bytes()[:10])
    return p, ["s.jsonl.gz:1", "truncated or corrupt gzip"]


def gz_trailing_garbage(d):
    p = d / "s.jsonl.gz"
    _gz(p, GOOD)
    p.write_bytes(p.read_bytes() + b"garbage after the member")
    return p, ["s.jsonl.gz:", "truncated or corrupt gzip"]


def truncated_gz_in_a_dir(d):
    p = d / "shards"
    p.mkdir()
    (p / "a.jsonl").write_bytes(GOOD)
    _gz(p / "b.jsonl.gz", b"".join(b'{"text": "doc %d"}\n' % i for i in range(50000)))
    data = (p / "b.jsonl.gz").read_bytes()
    (p / "b.jsonl.gz").write_bytes(data[: len(data) // 3])
    return p, [str(p / "b.jsonl.gz") + ":", "truncated or corrupt gzip"]


def only_hidden_files(d):
    p = d / "hidden"
    p.mkdir()
    (p / ".part.jsonl").write_bytes(GOOD)
    return p, ["holds no records"]


def empty_dir(d):
    p = d / "empty"
    p.mkdir()
    return p, ["holds no records"]


def line(content, *expected, name="s.jsonl", fmt="text"):
    def make(d):
        p = d / name
        p.write_bytes(GOOD + content + b"\n")
        return p, [f"{name}:2", *expected], fmt
    return make


def json_array_broken(d):
    p = d / "s.json"
    p.write_text('[\n  {"text": "fine"},\n  {"text": "broken"\n]\n')
    return p, ["s.json:4", "not valid JSON"]


def json_array_non_objects(d):
    p = d / "s.json"
    p.write_text("[1, 2]")
    return p, ["s.json:1", "not a JSON object"]


def corrupt_parquet(d):
    p = d / "s.parquet"
    p.write_bytes(b"PAR1" + os.urandom(100))
    return p, ["s.parquet", "could not be read"]


def parquet_missing_field(d):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = d / "s.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), str(p))
    return p, ["s.parquet:1", "lacks the configured field"]


def parquet_wrong_type(d):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = d / "s.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), str(p))
    return p, ["s.parquet:1", "wrong type"]


def corrupt_arrow(d):
    p = d / "s.arrow"
    p.write_bytes(os.urandom(200))
    return p, ["s.arrow", "could not be read"]


def text_file_latin1(d):
    p = d / "docs"
    p.mkdir()
    (p / "a.txt").write_bytes(b"caf\xe9 au lait")
    return p, ["a.txt", "not valid UTF-8"]


def text_file_blank(d):
    p = d / "docs"
    p.mkdir()
    (p / "a.txt").write_text("   \n")
    return p, ["a.txt", "empty"]


def chat(record, *expected):
    def make(d):
        p = d / "c.jsonl"
        p.write_text(json.dumps(CHAT_OK) + "\n" + json.dumps(record) + "\n")
        return p, ["c.jsonl:2", *expected], "chat"
    return make


CASES = {
    "truncated .jsonl.gz": truncated_gz,
    "corrupt .gz": corrupt_gz,
    "plain text named .gz": not_gzip_at_all,
    "bad JSON inside .gz": bad_json_in_gz,
    "empty .jsonl": empty_jsonl,
    "empty .jsonl.gz": empty_gz,
    "empty directory": empty_dir,
    "0-byte .gz": zero_byte_gz,
    ".gz cut inside its header": gz_cut_in_header,
    ".gz with trailing garbage": gz_trailing_garbage,
    "truncated .gz among good shards": truncated_gz_in_a_dir,
    "directory of hidden files only": only_hidden_files,
    "malformed JSON line": line(b'{"text": "x", }', "not valid JSON"),
    "line is not an object": line(b"[1, 2]", "not a JSON object"),
    "line lacks the field": line(b'{"body": "x"}', "lacks the configured field"),
    "field of the wrong type": line(b'{"text": 42}', "wrong type"),
    "line not UTF-8": line(b'{"text": "caf\xe9"}', "not valid UTF-8"),
    "empty document": line(b'{"text": ""}', "empty"),
    "JSON array cut short": json_array_broken,
    "JSON array of numbers": json_array_non_objects,
    "corrupt parquet": corrupt_parquet,
    "parquet without the field": parquet_missing_field,
    "parquet field of the wrong type": parquet_wrong_type,
    "corrupt arrow": corrupt_arrow,
    "text file not UTF-8": text_file_latin1,
    "blank text file": text_file_blank,
    "chat messages a string": chat({"messages": "hi"}, "wrong type"),
    "chat messages empty": chat({"messages": []}, "empty"),
    "chat message without content": chat({"messages": [{"role": "user"}]}, "wrong type"),
}


def _recipe(tmp_path, tokenizer_dir, source, **data):
    raw = tiny_raw(tmp_path)
    raw["data"].update(tokenizer=tokenizer_dir, num_workers=0, sources=[source], **data)
    return write_recipe(tmp_path, raw)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_data_file(case, tmp_path, capsys, tokenizer_dir):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    made = CASES[case](inputs)
    path, expected = made[0], made[1]
    fmt = made[2] if len(made) > 2 else "text"
    recipe = _recipe(tmp_path, tokenizer_dir, {"name": "s", "path": str(path), "format": fmt})
    line = expect_user_error(["data", "--recipe", recipe, "--strict", "--no-progress"], capsys, tmp_path,
                             str(path), *expected)
    assert "error: " + str(path) in line or f"({path}" in line or f" {path}" in line, line


def test_truncated_gz_without_strict_is_counted_with_its_file(tmp_path, capsys, tokenizer_dir):
    """Without --strict the lines before the cut are kept and the cut is reported as file:line, unreadable."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path, _ = truncated_gz(inputs)
    recipe = _recipe(tmp_path, tokenizer_dir, {"name": "s", "path": str(path)}, calibration_samples=1,
                     calibration_seq_length=4)
    from malformed import run_main

    code, err, _ = run_main(["data", "--recipe", recipe, "--no-progress"], capsys)
    assert code == 0, err
    with open(tmp_path / "runs" / "t" / "data" / "s.dropped.tsv") as f:
        rows = [r.rstrip("\n").split("\t") for r in f][1:]
    assert len(rows) == 1 and rows[0][0].startswith(f"{path}:") and rows[0][1] == "unreadable", rows
    report = json.load(open(tmp_path / "runs" / "t" / "data" / "report.json"))
    assert report["totals"]["written"] > 0


def _tokenizer_copy(tmp_path, tokenizer_dir, name, content):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    if content is None:
        os.remove(d / name)
    else:
        (d / name).write_bytes(content)
    return str(d)


TOKENIZER_CASES = {
    "malformed tokenizer.json": ("tokenizer.json", b'{"version": "1.0", "model": ', ["cannot load the data.tokenizer"]),
    "malformed tokenizer_config.json": ("tokenizer_config.json", b"{not json", ["tokenizer_config.json:1",
                                                                              "not valid JSON"]),
    "malformed special_tokens_map.json": ("special_tokens_map.json", b'{"eos_token": ', ["special_tokens_map.json:1",
                                                                                       "not valid JSON"]),
    "tokenizer.json missing": ("tokenizer.json", None, ["cannot load the data.tokenizer"]),
    "tokenizer_config.json not UTF-8": ("tokenizer_config.json", b'{"a": "\xff"}', ["tokenizer_config.json",
                                                                                  "not UTF-8"]),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_malformed_tokenizer(case, tmp_path, capsys, tokenizer_dir):
    name, content, expected = TOKENIZER_CASES[case]
    tok = _tokenizer_copy(tmp_path, tokenizer_dir, name, content)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "s.jsonl").write_bytes(GOOD)
    raw = tiny_raw(tmp_path)
    raw["data"].update(tokenizer=tok, num_workers=0, sources=[{"name": "s", "path": str(inputs / "s.jsonl")}])
    recipe = write_recipe(tmp_path, raw)
    expect_user_error(["data", "--recipe", recipe, "--strict", "--no-progress"], capsys, tmp_path, tok, *expected)


def test_tokenizer_larger_than_the_model(tmp_path, capsys, tokenizer_dir):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "s.jsonl").write_bytes(GOOD)
    raw = tiny_raw(tmp_path)
    raw["model"]["vocab_size"] = 256
    raw["data"].update(tokenizer=tokenizer_dir, num_workers=0, sources=[{"name": "s", "path": str(inputs / "s.jsonl")}],
                       demo_corpus={"records": 0, "seed": 0, "vocab_size": 256})
    recipe = write_recipe(tmp_path, raw)
    expect_user_error(["data", "--recipe", recipe, "--no-progress"], capsys, tmp_path, tokenizer_dir,
                      "model.vocab_size = 256")


@pytest.mark.parametrize("kind", ["s.jsonl", "docs/a.txt"])
def test_unreadable_source_file(kind, tmp_path, capsys, tokenizer_dir, monkeypatch):
    """No read permission (simulated: CI runs as root, which chmod does not stop): the file is named."""
    import builtins

    inputs = tmp_path / "inputs"
    (inputs / "docs").mkdir(parents=True)
    target = inputs / kind
    target.write_bytes(GOOD if kind.endswith("jsonl") else b"a text document")
    recipe = _recipe(tmp_path, tokenizer_dir, {"name": "s", "path": str(target.parent if "/" in kind else target)})
    real_open = builtins.open

    def guarded(file, *a, **k):
        if str(file) == str(target):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    expect_user_error(["data", "--recipe", recipe, "--strict", "--no-progress"], capsys, tmp_path, str(target),
                      "could not be read", "Permission denied")


def _saved_dataset(d):
    import datasets

    p = d / "hf"
    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(p))
    return p


def hf_state_torn(d):
    p = _saved_dataset(d)
    (p / "state.json").write_text('{"_data_files": [')
    return p


def hf_arrow_torn(d):
    p = _saved_dataset(d)
    arrow = next(f for f in os.listdir(p) if f.endswith(".arrow"))
    (p / arrow).write_bytes(b"not arrow")
    return p


@pytest.mark.parametrize("make", [hf_state_torn, hf_arrow_torn])
def test_torn_saved_hf_dataset(make, tmp_path, capsys, tokenizer_dir):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path = make(inputs)
    recipe = _recipe(tmp_path, tokenizer_dir, {"name": "s", "path": str(path)})
    expect_user_error(["data", "--recipe", recipe, "--strict", "--no-progress"], capsys, tmp_path, str(path))


def test_chat_template_that_does_not_render(tmp_path, capsys, tokenizer_dir):
    tok = tmp_path / "tok"
    import shutil

    shutil.copytree(tokenizer_dir, tok)
    (tok / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }{% endfor %}")  # unbalanced
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "c.jsonl").write_text(json.dumps(CHAT_OK) + "\n")
    raw = tiny_raw(tmp_path)
    raw["data"].update(tokenizer=str(tok), num_workers=0,
                       sources=[{"name": "c", "path": str(inputs / "c.jsonl"), "format": "chat"}])
    expect_user_error(["data", "--recipe", write_recipe(tmp_path, raw), "--no-progress"], capsys, tmp_path, str(tok),
                      "chat template", "data.sources[0] (c)")
