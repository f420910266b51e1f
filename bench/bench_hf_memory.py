"""Peak memory of ``import`` and ``export`` for a NemotronH of N and of 2N layers.

    python bench/bench_hf_memory.py [--layers 16] [--hidden 1024] [--workdir /tmp/hf_mem]

Writes three random bf16 HF NemotronH directories: N layers, 2N layers (same largest tensor, the
embedding / LM head) and N layers with twice the vocabulary (largest tensor doubled). Runs
``python -m pipeline import`` and ``export`` on each in a fresh process and reports its peak RSS
(``ru_maxrss``). A converter that held the model would grow with the layers; a streaming one grows with
the largest tensor only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MEASURE = ("import atexit, resource, sys\n"
           "atexit.register(lambda: print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
           " file=sys.stderr))\n"
           "from pipeline.cli import main\n"
           "main(sys.argv[1:])\n")


def model_config(layers: int, hidden: int, vocab: int = 32768):
    from pipeline.config.schema import ModelConfig

    cycle = "MEM*E"
    pattern = (cycle * layers)[:layers]
    return ModelConfig(num_layers=layers, pattern=pattern, hidden_size=hidden, vocab_size=vocab,
                       num_attention_heads=16, num_query_groups=2, attention_head_dim=64, mamba_num_heads=32,
                       mamba_head_dim=64, mamba_state_dim=64, mamba_num_groups=8, mamba_chunk_size=64,
                       ffn_hidden_size=2 * hidden, num_experts=16, moe_ffn_hidden_size=hidden // 2,
                       moe_shared_expert_ffn_hidden_size=hidden, moe_topk=4, moe_topk_scaling_factor=2.5)


def write_parent(path: str, model) -> int:
    """A random HF directory, written tensor by tensor; returns the weight bytes."""
    import json

    from pipeline.hf.config import hf_config_from_model
    from pipeline.hf.mapping import hf_shapes, links
    from pipeline.hf.safetensors_io import ShardWriter, plan_shards

    os.makedirs(path, exist_ok=True)
    shapes = hf_shapes(model)
    order = [(n, torch.bfloat16, shapes[n]) for link in links(model) for n in link.hf]
    shards = plan_shards(order, 1 << 30)
    weight_map, total, gen = {}, 0, torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = ShardWriter(os.path.join(path, name), shard)
        for n, dtype, shape in shard:
            w.write(n, (torch.randn(shape, generator=gen) * 0.02).to(dtype))
            weight_map[n] = name
        w.close()
        total += w.nbytes
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_from_model(model, dtype="bfloat16"), f)
    return total


def run_measured(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed:\n{proc.stderr[-3000:]}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")][-1]
    return int(peak.split()[1]) * 1024, seconds


def main() -> None:
    import dataclasses

    import yaml

    from pipeline.hf.mapping import hf_shapes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--workdir", default="/tmp/hf_mem")
    a = ap.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    rows = []
    for layers, vocab in ((a.layers, a.vocab), (2 * a.layers, a.vocab), (a.layers, 2 * a.vocab)):
        m = model_config(layers, a.hidden, vocab)
        tag = f"{layers}_{vocab}"
        hf, out = os.path.join(a.workdir, f"hf_{tag}"), os.path.join(a.workdir, f"out_{tag}")
        recipe = os.path.join(a.workdir, f"recipe_{tag}.yaml")
        with open(recipe, "w") as f:
            yaml.safe_dump({"run": {"name": f"bench{tag}", "root": os.path.join(a.workdir, "runs")},
                            "model": dataclasses.asdict(m)}, f, sort_keys=False)
        size = write_parent(hf, m)
        largest = max(torch.Size(s).numel() * 2 for s in hf_shapes(m).values())
        imp, t_imp = run_measured(["import", "--recipe", recipe, "--hf", hf])
        exp, t_exp = run_measured(["export", "--recipe", recipe, "--out", out])
        rows.append((layers, vocab, size, largest, imp, t_imp, exp, t_exp))
        for d in (hf, out, os.path.join(a.workdir, "runs")):
            shutil.rmtree(d, ignore_errors=True)
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    print("| layers | vocab | weights | largest tensor | import peak RSS | import s | export peak RSS | export s |")
    print("|---|---|---|---|---|---|---|---|")
    for layers, vocab, size, largest, imp, t_imp, exp, t_exp in rows:
        print(f"| {layers} | {vocab} | {mib(size)} | {mib(largest)} | {mib(imp)} | {t_imp:.0f} | {mib(exp)} | "
              f"{t_exp:.0f} |")
    base, deep, wide = rows
    print(f"\n2x layers: weights +{mib(deep[2] - base[2])}, import peak {deep[4] - base[4]:+,} B, "
          f"export peak {deep[6] - base[6]:+,} B")
    print(f"2x vocab (largest tensor +{mib(wide[3] - base[3])}): import peak +{mib(wide[4] - base[4])}, "
          f"export peak +{mib(wide[6] - base[6])}")


if __name__ == "__main__":
    main()
