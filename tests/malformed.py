"""Shared checks of the malformed-input suites (tests/test_malformed_*.py).

Each case runs the CLI in-process (``pipeline.cli.main``, the same code path as ``python -m pipeline`` without
re-importing torch and megatron per case) and asserts the contract of bad input: exit code 2, exactly one
``error:`` line on stderr naming the key or file, no traceback, and nothing created outside the run directory.
"""

import os

import yaml

from conftest import ROOT, TINY
from pipeline.cli import main


def tree(*roots):
    """Every path under ``roots`` (the roots included)."""
    out = set()
    for root in roots:
        if not os.path.exists(root):
            continue
        out.add(root)
        for d, dirs, files in os.walk(root):
            out.update(os.path.join(d, n) for n in dirs + files)
    return out


def tiny_raw(tmp_path, name="t"):
    """The tiny recipe as a dict, its run directory under ``tmp_path/runs``."""
    with open(TINY) as f:
        raw = yaml.safe_load(f)
    raw["run"].update(root=str(tmp_path / "runs"), name=name)
    return raw


def write_recipe(tmp_path, raw_or_text, name="recipe.yaml"):
    path = tmp_path / name
    if isinstance(raw_or_text, bytes):
        path.write_bytes(raw_or_text)
    elif isinstance(raw_or_text, str):
        path.write_text(raw_or_text)
    else:
        path.write_text(yaml.safe_dump(raw_or_text, sort_keys=False))
    return str(path)


def run_main(argv, capsys):
    """(exit code, stderr lines, stdout) of ``python -m pipeline ARGV``, in-process."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, err.strip().splitlines(), out


def expect_user_error(argv, capsys, tmp_path, *expected, run_dir=None, code=2):
    """Run ``argv``; assert exit ``code``, one ``error:`` line holding every string of ``expected``, no traceback,
    and no new path under ``tmp_path`` or the repository outside ``run_dir`` (default ``tmp_path/runs/t``)."""
    run_dir = str(run_dir or tmp_path / "runs" / "t")
    watched = (str(tmp_path), os.path.join(ROOT, "runs"))
    before, top = tree(*watched), set(os.listdir(ROOT))
    got, lines, out = run_main(argv, capsys)
    assert got == code, (got, lines[-5:], out[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in out and "Traceback" not in lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    new = tree(*watched) - before
    inside = lambda p: p == run_dir or p.startswith(run_dir + os.sep) or run_dir.startswith(p + os.sep)  # noqa: E731
    outside = sorted(p for p in new if not inside(p))
    assert not outside, f"written outside the run dir {run_dir}: {outside[:5]}"
    assert set(os.listdir(ROOT)) <= top, sorted(set(os.listdir(ROOT)) - top)
    return lines[0]
