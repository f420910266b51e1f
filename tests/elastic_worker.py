"""Shared helpers of the elastic tests, and the rank-side code of tests/test_elastic_parallel.py.

The parent: the tiny recipe's model (fp32, CPU) with its expert biases set to negative values, so an expert
masked by zeroing its bias would win top-k slots (the trap ``ElasticTopKRouter`` avoids). References are
sliced models: the parent's HF tensors through the project's slicer into a model of ``subnet.model_config``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List

import torch
import torch.distributed as dist

from pipeline import parallel
from pipeline.config.load import load_recipe
from pipeline.elastic.masks import ElasticMasks
from pipeline.elastic.masks.spec import build_elastic_model
from pipeline.elastic.router import ElasticRouter
from pipeline.elastic.subnet import Subnet
from pipeline.model.build import build_model

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "tiny.yaml")
SEQ, BATCH = 40, 2
REMOVAL_ORDER = [6, 3, 1, 4]  # a depth ranking for the tests (the importance stage computes the real one)

# name -> subnet fields; every axis alone, then combinations (depth with widths, everything at once)
SUBNETS = {
    "hidden": {"hidden": 96},
    "attention_heads": {"attention_heads": 2},
    "mamba_heads": {"mamba_heads": 4},
    "moe_ffn": {"moe_ffn": 48},
    "shared_expert_ffn": {"shared_expert_ffn": 64},
    "experts": {"experts": 4},
    "depth": {"skip_layers": [3, 6]},
    "widths": {"hidden": 64, "attention_heads": 2, "mamba_heads": 4, "moe_ffn": 32, "shared_expert_ffn": 96,
               "experts": 6},
    "all": {"hidden": 96, "attention_heads": 2, "mamba_heads": 4, "moe_ffn": 48, "shared_expert_ffn": 64,
            "experts": 4, "skip_layers": [1, 3, 6]},
}


def recipe(extra: List[str] = ()):
    return load_recipe(TINY, [f"training.seq_length={SEQ}"] + list(extra))


def subnet(m, name: str) -> Subnet:
    return dataclasses.replace(Subnet.full(m), **SUBNETS[name])


def tokens():
    return torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def forward(model, toks=None):
    """Logits of fixed tokens, on the model's device (CPU gloo or one GPU per rank: the same code)."""
    toks = (tokens() if toks is None else toks).to(device_of(model))
    return model(toks, torch.arange(toks.shape[1], device=toks.device).unsqueeze(0).expand_as(toks), None)


def build_parent(r, elastic: bool = False):
    """The parent (TP=1): seeded init, expert biases in [-1, -0.5) (a planted trap for expert masks)."""
    torch.manual_seed(7)
    model = (build_elastic_model(r) if elastic else build_model(r)).eval()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for mod in model.modules():
            if getattr(mod, "expert_bias", None) is not None:
                mod.expert_bias.copy_(-0.5 - 0.5 * torch.rand(mod.expert_bias.shape, generator=gen))
    return model


def sliced_logits(r, parent_hf: Dict[str, torch.Tensor], sub: Subnet) -> torch.Tensor:
    """Logits of the physically sliced model (TP=1)."""
    from pipeline.elastic.slicing import slice_state_dict
    from pipeline.hf.memory import load_hf_state

    small = sub.model_config(r.model)
    model = build_model(dataclasses.replace(r, model=small)).eval()
    load_hf_state(model, small, slice_state_dict(parent_hf, r.model, sub))
    with torch.no_grad():
        return forward(model)


# ---- 2 ranks: masked model sharded (TP=2 / PP=2 / EP=2) vs sliced TP=1 references


LAYOUTS = {
    "tp2": ["parallelism.tp=2", "parallelism.sequence_parallel=true"],  # etp = 1: whole experts per TP rank
    "tp2etp2": ["parallelism.tp=2", "parallelism.sequence_parallel=true", "parallelism.etp=2"],  # experts split
    "pp2": ["parallelism.pp=2"],
    "ep2": ["parallelism.ep=2"],
}


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _pipeline_forward(model):
    """Two pipeline stages by hand: stage 0 sends its hidden states to stage 1, which returns the logits."""
    from megatron.core import parallel_state

    prev, nxt = parallel_state.get_pipeline_model_parallel_prev_rank(), \
        parallel_state.get_pipeline_model_parallel_next_rank()
    if parallel_state.is_pipeline_first_stage():
        hidden = forward(model)
        dist.send(hidden.contiguous(), nxt)
        return None
    hidden = torch.empty(SEQ, BATCH, model.config.hidden_size, device=device_of(model))
    dist.recv(hidden, prev)
    model.set_input_tensor(hidden)
    return forward(model)


def _router_grad(model, masks, r, teacher: torch.Tensor, layout: str) -> torch.Tensor:
    """The router's gradient (flattened) from one KD step through a hard choice's masks, summed over the
    ranks that each compute a part of the model (TP shards, PP stages) as the elastic stages reduce it."""
    from megatron.core import parallel_state as ps

    from pipeline.elastic.kd import forward_kl

    dev = device_of(model)
    torch.manual_seed(0)  # the same router on every rank
    router = ElasticRouter(r.elastic, r.model).to(dev)
    masks.set_choice(router(1, 1.0, 1.0, hard=True, generator=torch.Generator(device=dev).manual_seed(4)))
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    vocab = teacher.shape[-1] // tp
    kd = lambda logits: forward_kl(logits, teacher[..., tp_rank * vocab:(tp_rank + 1) * vocab], None).mean()  # noqa
    if layout != "pp2":
        kd(forward(model)).backward()
    elif ps.is_pipeline_first_stage():
        hidden = forward(model)
        dist.send(hidden.detach().contiguous(), ps.get_pipeline_model_parallel_next_rank())
        grad = torch.empty_like(hidden)
        dist.recv(grad, ps.get_pipeline_model_parallel_next_rank())
        hidden.backward(grad)
    else:
        hidden = torch.empty(SEQ, BATCH, model.config.hidden_size, device=dev)
        dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden.requires_grad_(True))
        kd(forward(model)).backward()
        dist.send(hidden.grad.contiguous(), ps.get_pipeline_model_parallel_prev_rank())
    grad = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=dev)
                      for p in router.parameters()])
    if layout in ("tp2", "tp2etp2", "pp2"):
        dist.all_reduce(grad, group=ps.get_pipeline_model_parallel_group() if layout == "pp2"
                        else ps.get_tensor_model_parallel_group())
    if layout == "ep2":  # an expert's FFN mask acts on the expert's rank, for every rank's tokens: DDP's mean
        dist.all_reduce(grad, group=ps.get_expert_model_parallel_group())
        grad /= dist.get_world_size(ps.get_expert_model_parallel_group())
    masks.clear()
    return grad


def masked_vs_sliced(root: str, layouts: List[str], extra: List[str] = ()) -> Dict:
    """Per layout and subnet, max |masked - sliced| of the logits (on the rank holding full logits).
    ``extra``: recipe overrides for every model here (``model.backend=te`` on GPUs: tests/gpu/test_multi_gpu.py);
    on GPUs each rank runs on its own device through NCCL, the rest is the CPU gloo code as is."""
    from pipeline.hf.memory import hf_state_from_model
    from pipeline.training import checkpoint

    base = [f"run.root={root}", "elastic.axes.depth=[8, 5]", *extra]
    r = recipe(base)
    parallel.initialize(r)  # TP = PP = 1, DP = 2: both ranks build the same parent
    parent = build_parent(r, elastic=True)
    hf = {k: v.cpu() for k, v in hf_state_from_model(parent, r.model).items()}
    refs = {name: sliced_logits(r, hf, subnet(r.model, name)) for name in SUBNETS}
    with torch.no_grad():
        refs["parent"] = forward(parent)
    ckpt = os.path.join(root, "parent")
    checkpoint.save(ckpt, 0, [parent])
    ref_grad = _router_grad(parent, ElasticMasks(parent, r.model, r.elastic.axes, REMOVAL_ORDER), r,
                            refs["parent"], "tp1")
    # guards the comparisons against 0 == 0: every subnet changes the logits, the router gets a gradient
    out = {"logit_scale": float(refs["parent"].abs().max()),
           "subnet_effect": min(float((refs[n] - refs["parent"]).abs().max()) for n in SUBNETS),
           "router_grad_norm": float(ref_grad.norm()), "router_grad_diff": {}}
    for layout in layouts:
        rl = recipe(base + LAYOUTS[layout])
        parallel.initialize(rl)
        model = build_elastic_model(rl).eval()
        checkpoint.load(checkpoint.resolve(ckpt), [model], load_rng=False)
        masks = ElasticMasks(model, rl.model, rl.elastic.axes, REMOVAL_ORDER)
        run = _pipeline_forward if layout == "pp2" else forward
        diffs = {}
        for name in ["parent"] + list(SUBNETS):
            masks.clear() if name == "parent" else masks.set_subnet(subnet(rl.model, name))
            with torch.no_grad():
                logits = run(model)
            if logits is not None:
                diffs[name] = float((_gather_vocab(logits) - refs[name]).abs().max())
        out[layout] = diffs
        grad = _router_grad(model, masks, rl, refs["parent"], layout)
        out["router_grad_diff"][layout] = float((grad - ref_grad).norm() / ref_grad.norm())
    parallel.shutdown()
    return out


def kd_tp2() -> Dict:
    """forward_kl at TP=2 on vocabulary shards: values and the student's gradient shard."""
    from megatron.core import parallel_state

    from pipeline.elastic.kd import forward_kl

    parallel.initialize(recipe(["parallelism.tp=2"]))
    gen = torch.Generator().manual_seed(5)
    student, teacher = 3 * torch.randn(2, 6, 64, generator=gen), 3 * torch.randn(2, 6, 64, generator=gen)
    mask = (torch.rand(2, 6, generator=gen) > 0.3).float()
    rank = parallel_state.get_tensor_model_parallel_rank()
    shard = slice(32 * rank, 32 * (rank + 1))
    s = student[..., shard].clone().requires_grad_(True)
    out = {}
    for temperature in (1.0, 2.0):
        for chunk in (0, 5):  # all tokens at once; 5-token chunks (12 tokens: a ragged last chunk)
            s.grad = None
            kl = forward_kl(s, teacher[..., shard], mask, temperature, chunk_tokens=chunk)
            kl.sum().backward()
            out[(temperature, chunk)] = {"kl": kl.detach(), "grad": s.grad.clone()}
    parallel.shutdown()
    return {"rank": rank, "student": student, "teacher": teacher, "mask": mask, "out": out}
