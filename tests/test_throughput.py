"""Throughput plumbing on CPU: the MFU's FLOP count (teacher forward included) against a hand count."""

from conftest import TINY
from pipeline.config import load_recipe
from pipeline.model.params import count_model
from pipeline.training.metrics import flops_per_token


def test_flops_per_token_counts_the_teachers_forward():
    m = load_recipe(TINY).model  # pattern MEM*EM*E, 2 attention layers of 4 heads x 32
    seq = 256
    matmul = count_model(m).active - m.vocab_size * m.hidden_size  # the input embedding is a lookup
    attn_fwd = 2 * 2 * seq * 4 * 32  # QK^T and AV, causal half: 2 x seq x width per layer, 2 layers
    student = 6 * matmul + 3 * attn_fwd  # forward + backward (2x the forward)
    teacher = 2 * matmul + attn_fwd  # forward only
    assert flops_per_token(m, seq) == student
    assert flops_per_token(m, seq, teacher_forward=True) == student + teacher


def bench_module():
    """bench/bench_throughput.py as a module (bench/ is not a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "bench_throughput.py")
    spec = importlib.util.spec_from_file_location("bench_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_gpu_busy_time_counts_overlapping_kernels_once():
    bench = bench_module()
    # two streams overlapping on [5, 10), a nested kernel, a gap [20, 30), touching intervals
    assert bench.covered([(0, 10), (5, 15), (6, 7), (30, 40), (40, 45)]) == 30
    assert bench.covered([]) == 0


def test_operators_are_counted_per_issuing_line_and_backward():
    import torch

    bench = bench_module()
    w = torch.ones(3, requires_grad=True)

    def step(i):
        x = w * 2  # one mul
        y = (x + i).sum()  # one add, one sum
        y.backward()  # the backward's ops: counted on the line that runs it (megatron's schedule, in a step)

    total, sites = bench.op_sites(step, 1, lambda: None)
    line = step.__code__.co_firstlineno
    assert total == sum(sites.values()) == 1 + 2 + sites[f"tests/test_throughput.py:{line + 3}"]
    assert sites[f"tests/test_throughput.py:{line + 1}"] == 1 and sites[f"tests/test_throughput.py:{line + 2}"] == 2
    assert sites[f"tests/test_throughput.py:{line + 3}"] >= 2  # mul and sum backward at least


def test_fused_grouped_mlp_only_for_plain_te_models_of_the_supported_shape():
    import dataclasses

    from pipeline.model.build import fused_grouped_mlp

    r = load_recipe(TINY, ["model.moe_fused_grouped_mlp=true"])  # squared-ReLU experts, etp 1
    assert fused_grouped_mlp(r, use_te=True, plain=True)
    assert not fused_grouped_mlp(r, use_te=True, plain=False)  # elastic student / QAD: masks, quantisers on fc1/fc2
    assert not fused_grouped_mlp(r, use_te=False, plain=True)  # megatron's local experts
    assert not fused_grouped_mlp(load_recipe(TINY), use_te=True, plain=True)  # the key off (default)
    gated = dataclasses.replace(r, model=dataclasses.replace(r.model, activation="swiglu"))
    assert not fused_grouped_mlp(gated, use_te=True, plain=True)
    etp2 = dataclasses.replace(r, parallelism=dataclasses.replace(r.parallelism, etp=2))
    assert not fused_grouped_mlp(etp2, use_te=True, plain=True)


def test_bench_times_each_variant_and_reports_a_failed_one(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_throughput.py"), "--recipe", TINY,
                           "--steps", "1", "--warmup", "1", "--memory-seq", "0", "--variant", "bad:model.pattern=QQQ",
                           "--json", str(out)], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "FAILED bad" in proc.stdout and "unknown layer symbol" in proc.stderr
    rows = json.load(open(out))["rows"]
    assert [(r["variant"], r["step"]) for r in rows] == [("recipe", s) for s in ("pretrain", "kd", "elastic")]
    assert all(r["tokens_per_s"] > 0 for r in rows)
