"""pipeline/compat/cpu.py is pinned to one megatron-core version, and says which call sites it redirected.

A version bump fails here first (re-check every patched module); after a small model's forward and backward,
``report()`` names the redirected megatron call sites, so a changed call site shows up as a changed report."""

from importlib.metadata import version

import pytest
import torch

from pipeline.compat import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallbacks are inactive with CUDA")


def test_pinned_megatron_core_version():
    # (megatron.core.__version__ appends the git hash of the working directory's repository: read the dist)
    assert version("megatron-core") == cpu.MCORE_VERSION


def test_report_names_the_redirected_call_sites():
    from elastic_worker import build_parent, forward, recipe

    from pipeline import parallel

    r = recipe()
    parallel.initialize(r)
    try:
        forward(build_parent(r)).float().pow(2).mean().backward()
    finally:
        parallel.shutdown()
    lines = cpu.report().splitlines()
    assert lines, "no CUDA call site was redirected: the CPU compat layer did nothing"
    sites = "\n".join(lines)
    assert "megatron/core/" in sites  # a file:line inside megatron-core, with its hit count
    assert all(line.split()[0].isdigit() for line in lines)
    for module in cpu.PATCHED_MODULES:  # every patched module exists in this megatron-core
        __import__(module)
