"""Run a function on N gloo ranks under torchrun and collect what each rank returns.

    from dist_helpers import run_ranks

    def test_something(tmp_path):
        results = run_ranks("my_worker:main", nproc=2, tmp_path=tmp_path, kwargs={"steps": 1})
        assert results[0]["loss"] == results[1]["loss"]

``my_worker`` is a module in tests/ (or importable from the repo root); ``main(**kwargs)`` runs on every rank
inside ``python -m torch.distributed.run --standalone --nproc-per-node N`` with OMP_NUM_THREADS=1 (the env://
variables are set, so ``pipeline.parallel.initialize`` joins the group). Whatever it returns (anything
``torch.save`` stores: numbers, dicts of tensors) comes back as ``results[rank]``. kwargs must be JSON.

On failure (a non-zero exit or a timeout) the AssertionError carries the tail of every rank's stderr, so a
failing 2-rank test reads like a failing 1-rank one; the full logs stay under the named work directory
(``logs/<run>/attempt_0/<rank>/{stdout,stderr}.log``). Each launch costs ~10-15 s of imports on CPU: put several
cases into one worker call (re-running ``pipeline.parallel.initialize`` per case) rather than one launch each.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
STDERR_TAIL = 4000  # characters of each rank's stderr shown on failure


def run_ranks(target: str, nproc: int, tmp_path, kwargs: Optional[Dict[str, Any]] = None,
              timeout: float = 300) -> List[Any]:
    """Call ``module:function`` on ``nproc`` ranks; returns the per-rank return values, rank order."""
    import torch

    work = tempfile.mkdtemp(prefix=f"ranks_{target.replace(':', '_')}_{nproc}_", dir=str(tmp_path))
    out, logs = os.path.join(work, "results"), os.path.join(work, "logs")
    os.makedirs(out, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    args_file = os.path.join(work, "kwargs.json")
    with open(args_file, "w") as f:
        json.dump(kwargs or {}, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([TESTS, REPO, os.environ.get("PYTHONPATH", "")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a parent group (an outer torchrun) must not leak into the child's rendezvous
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--log-dir={logs}", "--redirects=3", os.path.abspath(__file__), target, out, args_file]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        launcher_out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks (own session)
        launcher_out, _ = proc.communicate()
        raise AssertionError(f"{target} on {nproc} ranks timed out after {timeout:.0f} s (logs: {work})\n"
                             + _rank_tails(logs, nproc) + _tail(launcher_out))
    missing = [r for r in range(nproc) if not os.path.isfile(_result_path(out, r))]
    if proc.returncode != 0 or missing:
        raise AssertionError(f"{target} on {nproc} ranks failed (exit {proc.returncode}, no result from ranks "
                             f"{missing}; logs: {work})\n" + _rank_tails(logs, nproc) + _tail(launcher_out))
    return [torch.load(_result_path(out, r), weights_only=False) for r in range(nproc)]


def _result_path(out: str, rank: int) -> str:
    return os.path.join(out, f"rank{rank}.pt")


def _tail(text: str) -> str:
    return f"--- launcher output (tail) ---\n{text[-1500:]}" if text else ""


def _rank_tails(logs: str, nproc: int) -> str:
    parts = []
    for r in range(nproc):
        # torchrun layout: <log-dir>/<run id>/attempt_0/<local rank>/stderr.log
        files = sorted(glob.glob(os.path.join(logs, "*", "attempt_*", str(r), "stderr.log")))
        text = open(files[-1], errors="replace").read() if files else "(no stderr log)"
        parts.append(f"--- rank {r} stderr (tail) ---\n{text[-STDERR_TAIL:]}\n")
    return "".join(parts)


def _rank_main() -> None:
    """Entry point inside torchrun: import the target, call it, save its return value for this rank."""
    import importlib

    import torch

    target, out, args_file = sys.argv[1:4]
    sys.path[:0] = [TESTS, REPO]
    module, _, func = target.partition(":")
    with open(args_file) as f:
        kwargs = json.load(f)
    result = getattr(importlib.import_module(module), func)(**kwargs)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    path = _result_path(out, int(os.environ["RANK"]))
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    _rank_main()
