"""Where do two models that should agree part ways? Layer-by-layer relative differences (GPU diagnostic).

1. the same weights in megatron's local layers and in TE's (``local_vs_te``);
2. the hidden-masked elastic TE model vs the physically sliced TE model (``masked_vs_sliced``), and the same on the
   local backend for contrast.
Run on the device machine with TE on PYTHONPATH: ``python tests/gpu/probe_te_layers.py``; prints one line per
module output: max|a-b| / max|b| (masked outputs compared on the sliced model's channel prefix).
"""

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from elastic_worker import REMOVAL_ORDER, build_parent, recipe, subnet  # noqa: E402


def capture(model):
    outs = {}

    def hook(name):
        def fn(module, inputs, output):
            t = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(t):
                outs[name] = t.detach().float().clone()
        return fn

    for name, mod in model.named_modules():
        if name.count(".") <= 3 and name:
            mod.register_forward_hook(hook(name))
    return outs


def compare(tag, a_outs, b_outs):
    for name, b in b_outs.items():
        a = a_outs.get(name)
        if a is None:
            continue
        if a.shape != b.shape:
            if a.shape[:-1] != b.shape[:-1]:
                continue
            a = a[..., : b.shape[-1]]
        rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        print(f"{tag:28s} {name:45s} {tuple(b.shape)!s:20s} rel {rel:.3e}", flush=True)


def main():
    from pipeline import parallel
    from pipeline.elastic.masks import ElasticMasks
    from pipeline.elastic.masks.spec import build_elastic_model
    from pipeline.elastic.slicing import slice_state_dict
    from pipeline.hf.memory import hf_state_from_model, load_hf_state
    from pipeline.model.build import build_model

    print("TF32 override:", os.environ.get("NVIDIA_TF32_OVERRIDE"), flush=True)
    backend = os.environ.get("PROBE_BACKEND", "te")  # local: a CPU smoke run of this script
    r = recipe([f"model.backend={backend}", "elastic.axes.depth=[8, 5]"])
    r_local = dataclasses.replace(r, model=dataclasses.replace(r.model, backend="local"))
    dev = parallel.initialize(r)
    tok = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(3)).to(dev)
    pos = torch.arange(256, device=dev)[None].expand(2, -1)
    fwd = lambda model: model(tok, pos, None)  # noqa: E731
    te = build_parent(r)
    hf = {k: v.cpu() for k, v in hf_state_from_model(te, r.model).items()}
    local = build_model(r_local).eval()
    load_hf_state(local, r.model, hf)
    with torch.no_grad():
        a, b = capture(te), capture(local)
        fwd(te), fwd(local)
    compare("local_vs_te", a, b)
    for backend, rr in (("te", r), ("local", r_local)):
        sub = subnet(rr.model, "hidden")
        small = sub.model_config(rr.model)
        sliced = build_model(dataclasses.replace(rr, model=small)).eval()
        load_hf_state(sliced, small, slice_state_dict(hf, rr.model, sub))
        elastic = build_elastic_model(rr).eval()
        load_hf_state(elastic, rr.model, hf)
        masks = ElasticMasks(elastic, rr.model, rr.elastic.axes, REMOVAL_ORDER)
        masks.set_subnet(sub)
        with torch.no_grad():
            a, b = capture(elastic), capture(sliced)
            fwd(elastic), fwd(sliced)
        compare(f"masked_vs_sliced[{backend}]", a, b)
    parallel.shutdown()


if __name__ == "__main__":
    main()
