"""Prefill and decode tokens/s of every budget of an elastic checkpoint vs the full model, per engine.

    python bench/bench_budget_inference.py --recipe recipes/proxy_1b.yaml --checkpoint /tmp/proxy_elastic \\
        --make-checkpoint [--batch 8 --prompt-len 1024 --decode-len 128] [--json out.json]

Engines (transformers NemotronH, mamba-ssm / causal-conv1d kernels when installed):
- ``views``: every budget a view model of ONE loaded full model (pipeline/inference/views.py), its grouped-head
  rows gathered once per call (``parametrize.cached``, as generate and budget-eval run it);
- ``sliced``: every budget a contiguous copy (the model ``slice`` writes, bit for bit, built in memory);
- ``megatron``: every budget sliced into megatron-core (``slice --format megatron``) and run in megatron's static
  inference mode (KV cache + Mamba states, greedy; pipeline/inference/megatron_engine.py).
Same batch, prompt and decode lengths, dtype (bf16) for every row. Prefill: one forward of
batch x prompt-len tokens (no cache), median of --repeats after a warm-up. Decode: ``generate`` of exactly
decode-len new tokens greedy, minus the prefill time, median of --repeats. Parameter memory: the bytes of
the distinct storages behind each engine's models (all budgets held at once). ``--make-checkpoint`` writes
a random-init elastic checkpoint of the recipe first (pipeline/inference/random_checkpoint.py): speed does
not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: kernel selection, autotuning, allocator
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, batch: int, prompt_len: int, decode_len: int, repeats: int, vocab: int) -> dict:
    from transformers import GenerationConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(model.device)
    mask = torch.ones_like(x)
    gc = GenerationConfig(max_new_tokens=decode_len, min_new_tokens=decode_len, do_sample=False, pad_token_id=0,
                          eos_token_id=None, use_cache=True)
    from torch.nn.utils import parametrize

    with torch.no_grad(), parametrize.cached():  # as control.py runs a view: one gather per call
        prefill = timed(lambda: model(input_ids=x, attention_mask=mask, use_cache=False, logits_to_keep=1), repeats)
        full = timed(lambda: model.generate(x, attention_mask=mask, generation_config=gc), repeats)
    decode = max(full - prefill, 1e-9)
    return {"prefill_tok_s": batch * prompt_len / prefill, "decode_tok_s": batch * decode_len / decode,
            "prefill_s": prefill, "generate_s": full}


def measure_megatron(model, batch: int, prompt_len: int, decode_len: int, repeats: int, vocab: int) -> dict:
    """The prompts' forward into fresh static-inference states, then ``greedy_generate`` (prompts + decode-len
    tokens); decode = generate - prefill, as for transformers."""
    from megatron.core.inference.contexts.static_context import StaticInferenceContext
    from megatron.core.inference.utils import InferenceMode

    from pipeline.inference.megatron_engine import greedy_generate

    device = next(model.parameters()).device
    x = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(prompt_len, device=device).unsqueeze(0).expand(batch, -1)

    def prefill():
        with torch.no_grad(), InferenceMode.active():
            model(x, positions, None, inference_context=StaticInferenceContext(batch, prompt_len + decode_len),
                  runtime_gather_output=True)

    first = timed(prefill, repeats)
    full = timed(lambda: greedy_generate(model, x, decode_len), repeats)
    decode = max(full - first, 1e-9)
    return {"prefill_tok_s": batch * prompt_len / first, "decode_tok_s": batch * decode_len / decode,
            "prefill_s": first, "generate_s": full}


def megatron_models(args, family, names, dtype) -> dict:
    """Each budget sliced into megatron (a temporary directory, removed once loaded) and built as the recipe
    builds models."""
    import tempfile

    from pipeline import parallel
    from pipeline.config import load_recipe
    from pipeline.inference.megatron_engine import load_budget_model

    recipe = load_recipe(args.recipe)
    parallel.initialize(recipe)
    models = {}
    with tempfile.TemporaryDirectory(prefix="megatron_engine_") as work:
        for n in names:
            models[n] = load_budget_model(recipe, family.dir, family.model_cfg, family.budget(n),
                                          os.path.join(work, n), dtype)
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "proxy_1b.yaml"))
    ap.add_argument("--checkpoint", required=True, help="elastic checkpoint directory")
    ap.add_argument("--make-checkpoint", action="store_true", help="write a random-init one there first")
    ap.add_argument("--engines", nargs="+", default=["views", "sliced"], choices=["views", "sliced", "megatron"],
                    help="megatron: each budget sliced into megatron-core, run in its static inference mode")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--decode-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args()

    from pipeline.config import load_recipe
    from pipeline.inference.family import Family, quiet_transformers
    from pipeline.inference.random_checkpoint import make_random_checkpoint
    from pipeline.inference.views import gathered_bytes, parameter_bytes

    quiet_transformers()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.make_checkpoint:
        t0 = time.perf_counter()
        make_random_checkpoint(load_recipe(args.recipe), args.checkpoint, dtype)
        print(f"# random-init elastic checkpoint of {args.recipe} -> {args.checkpoint} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    family = Family.load(args.checkpoint, args.device, args.dtype)
    dev = family.device
    print(f"# {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, {args.dtype}, batch {args.batch}, "
          f"prompt {args.prompt_len}, decode {args.decode_len}, median of {args.repeats}", flush=True)
    names = [n for n in family.names if family.budget(n).subnet.homogeneous]
    vocab = family.model_cfg.vocab_size
    rows = []
    for engine in args.engines:
        if engine == "megatron":
            fam, models, timing = None, megatron_models(args, family, names, dtype), measure_megatron
            held = parameter_bytes(list(models.values()))
        else:
            fam = Family(family.dir, family.full, family.model_cfg, family.budgets, family.base_cfg,
                         family.tokenizer, engine)
            models, timing = {n: fam.model(n) for n in names}, measure
            held = parameter_bytes([family.full, *models.values()])
        for n in names:
            r = timing(models[n], args.batch, args.prompt_len, args.decode_len, args.repeats, vocab)
            r.update(engine=engine, budget=n, active_params=family.active_params(n),
                     params=int(family.budget(n).subnet.count(family.model_cfg).total),
                     gathered_bytes_per_call=0 if engine == "megatron" else gathered_bytes(models[n]),
                     engine_param_bytes=held)
            rows.append(r)
            base = next(x for x in rows if x["engine"] == engine and x["budget"] == names[0])
            print(f"{engine:<7} {n:<8} active {r['active_params'] / 1e6:9.1f}M  prefill {r['prefill_tok_s']:10.0f} "
                  f"tok/s ({r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x)  decode {r['decode_tok_s']:9.0f} "
                  f"tok/s ({r['decode_tok_s'] / base['decode_tok_s']:.2f}x)  params held {held / 2**20:,.1f} MiB",
                  flush=True)
        del fam, models
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if {"views", "sliced"} <= set(args.engines):  # what the measurement says about the engine
        for n in names:
            v, c = (next(x for x in rows if x["engine"] == e and x["budget"] == n) for e in ("views", "sliced"))
            print(f"# {n}: views / sliced  prefill {v['prefill_tok_s'] / c['prefill_tok_s']:.2f}x  decode "
                  f"{v['decode_tok_s'] / c['decode_tok_s']:.2f}x  (views hold {v['engine_param_bytes'] / 2**20:,.1f} "
                  f"MiB of parameters for every budget, sliced {c['engine_param_bytes'] / 2**20:,.1f} MiB)")
    others = [e for e in args.engines if e != "megatron"]
    if "megatron" in args.engines and others:
        for n in names:
            m = next(x for x in rows if x["engine"] == "megatron" and x["budget"] == n)
            for e in others:
                o = next(x for x in rows if x["engine"] == e and x["budget"] == n)
                print(f"# {n}: megatron / {e}  prefill {m['prefill_tok_s'] / o['prefill_tok_s']:.2f}x  decode "
                      f"{m['decode_tok_s'] / o['decode_tok_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
