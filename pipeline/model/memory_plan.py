"""Memory plan of a training stage: what one GPU holds at its peak, term by term, and whether it fits.

Per GPU (the worst pipeline stage): weights, gradient buffer (megatron DDP reduces in fp32), optimizer state
(fp32 master + Adam m, v; sharded over data-parallel ranks with the distributed optimizer), the frozen teacher
(elastic stages), activations per layer kind for the in-flight micro-batches at the stage's sequence length
with the chosen recompute, the logits buffer (LM loss, or KD with student + teacher logits), the MoE dispatch
buffers. Activation terms count the tensors megatron / TE / mamba-ssm save for the backward, per token
(docs/memory_plan.md lists them); bench/bench_memory_plan.py compares the plan with measured peaks.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from pipeline.config.schema import TRAIN_STAGES, Recipe
from pipeline.model.params import Dims, layer_params

GIB = 1024 ** 3
RESERVE = 0.10  # share of the GPU kept free for the allocator's fragmentation, NCCL and CUDA context
# Terms that live at different moments of a step: the loss's logits buffers exist from the LM head to the head's
# backward, a layer's transients (its dispatch buffers; with recompute, the layer re-run with its full
# activations) while that layer runs. The peak is the stored terms plus the larger phase, not their sum
# (measured on the H200 with full recompute at 64K: the sum overstated stage 1 by 13%; tests/gpu/RESULTS.md).
PHASES = {"lm logits": "loss", "kd logits": "loss", "activations recompute": "layer", "moe dispatch": "layer"}


@dataclass
class MemoryPlan:
    stage: str
    gpus: int
    layout: str
    lines: List[tuple] = field(default_factory=list)  # (name, bytes, note)
    gpu_gib: float = 80.0

    @property
    def total(self) -> float:
        """The peak: every stored term, plus the larger of the loss phase and the layer phase (PHASES)."""
        phase: Dict[str, float] = {}
        for name, b, _ in self.lines:
            if name in PHASES:
                phase[PHASES[name]] = phase.get(PHASES[name], 0.0) + b
        return sum(b for n, b, _ in self.lines if n not in PHASES) + max(phase.values(), default=0.0)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_gib * GIB * (1 - RESERVE)

    def term(self, prefix: str) -> float:
        return sum(b for n, b, _ in self.lines if n.startswith(prefix))


def _sizes(recipe: Recipe):
    m = recipe.model
    return dict(h=m.hidden_size, v=m.vocab_size, di=m.mamba_num_heads * m.mamba_head_dim,
                gn=m.mamba_num_groups * m.mamba_state_dim, nh=m.mamba_num_heads, nq=m.num_attention_heads,
                ng=m.num_query_groups, hd=m.attention_head_dim, e=m.num_experts, k=m.moe_topk,
                f=m.moe_ffn_hidden_size, sf=m.moe_shared_expert_ffn_hidden_size, ffn=m.ffn_hidden_size)


def causal_conv1d() -> bool:
    """Whether megatron's Mamba mixer runs causal-conv1d's fused conv + activation here (else F.conv1d + silu).
    Planning elsewhere than the training machine assumes the same packages (without it: the larger figure)."""
    return importlib.util.find_spec("causal_conv1d") is not None


def expert_params(recipe: Recipe, sym: str) -> int:
    m = recipe.model
    return m.num_experts * 2 * m.hidden_size * m.moe_ffn_hidden_size if sym == "E" else 0


def layer_activation_elements(sym: str, recipe: Recipe, p, seq: int, te: bool, recompute: str,
                              modules: List[str], elastic: bool, conv_fused: Optional[bool] = None) -> Dict[str, float]:
    """Elements saved for the backward per token of this rank's sequence shard, by part of the layer, and
    fp32 elements separately (key ``fp32``). Sequence parallelism divides the hidden-sized tensors by tp.
    ``conv_fused``: the Mamba conv runs causal-conv1d's fused kernel (None: whether it imports here)."""
    z = _sizes(recipe)
    tp, etp = p.tp, p.etp
    hs = z["h"] / tp if (tp > 1 and p.sequence_parallel) else z["h"]
    sel = recompute == "selective"
    out: Dict[str, float] = {}

    def with_elastic(out):  # the residual delta the hidden mask multiplies (masked inputs keep no copy:
        if elastic:         # masks/saving.py); not under recompute of the whole layer or module
            out["elastic"] = hs
        return out

    if recompute == "full":
        return {"input": hs}
    if sym == "M":
        di, gn, nh = z["di"] / tp, z["gn"] / tp, z["nh"] / tp
        xbc = di + 2 * gn
        if sel and "mamba" in modules:  # the mixer's input only (TE: norm fused into in_proj, inside the mixer)
            return {"input": hs if te else 2 * hs}
        out["norm+in_proj"] = 2 * hs  # norm input and output (TE: fused into in_proj, the same two)
        # conv input copy, x/B/C copies the scan keeps, and without causal-conv1d (which fuses the activation
        # into the conv) the conv output too: the silu's input
        out["conv"] = (2 if (causal_conv1d() if conv_fused is None else conv_fused) else 3) * xbc
        out["ssm"] = di + nh  # scan output, dt
        out["gated_norm"] = 3 * di  # y and z copies, output (out_proj's input)
        out["fp32"] = nh + z["gn"] / tp / max(recipe.model.mamba_state_dim, 1)  # dA_cumsum, rstd per group
        return with_elastic(out)
    if sym == "*":
        nq, ng, hd = z["nq"] / tp, z["ng"] / tp, z["hd"]
        out["norm+qkv"] = 2 * hs
        if te:  # fused (flash) attention: q, k, v, output, the softmax statistics
            core = nq * hd + 2 * ng * hd + nq * hd
            out["fp32"] = nq
        else:  # megatron's local attention: the qkv buffer, k and v expanded to the query heads (GQA), output,
            # the [s x s] probabilities
            core = (nq + 2 * ng) * hd + (2 * nq * hd if ng < nq else 0) + nq * hd + nq * seq / p.cp
        if sel and "core_attn" in modules:
            core = nq * hd + 2 * ng * hd  # the checkpoint keeps q, k, v
            out.pop("fp32", None)
        out["core_attn"] = core
        return with_elastic(out)
    if sym == "E":
        k, f, sf = z["k"], z["f"] / etp, z["sf"] / tp
        tok = 1.0 / tp if tp > 1 and p.sequence_parallel else 1.0  # each TP rank dispatches its sequence shard
        norm = hs if (sel and "layernorm" in modules) else 2 * hs
        if sel and "moe" in modules:
            return {"norm": norm}
        out["norm"] = norm
        out["router"] = 0.0
        out["fp32"] = 3 * z["e"] * tok  # logits, scores, routing probabilities
        experts = k * tok * (2 * z["h"] + (1 if sel and "moe_act" in modules else 2) * f)
        out["experts"] = experts
        out["shared_expert"] = 0.0 if (sel and "shared_experts" in modules) else 2 * sf
        return with_elastic(out)
    if sym == "-":
        ffn = z["ffn"] / tp
        out["norm"] = 2 * hs
        out["mlp"] = 0.0 if (sel and "mlp" in modules) else 2 * ffn
        return with_elastic(out)
    raise ValueError(sym)


def layer_activation_bytes(sym: str, recipe: Recipe, p, seq: int, te: bool, recompute: str, modules: List[str],
                           elastic: bool, a: float = 2.0, conv_fused: Optional[bool] = None) -> float:
    """Bytes saved for the backward per token of this rank's shard (activations of ``a`` bytes, fp32 extras)."""
    el = layer_activation_elements(sym, recipe, p, seq, te, recompute, modules, elastic, conv_fused)
    return sum(v for key, v in el.items() if key != "fp32") * a + el.get("fp32", 0.0) * 4


def _stage_layers(recipe: Recipe, p) -> List[str]:
    from pipeline.model.build import pipeline_pattern

    return pipeline_pattern(recipe.model.pattern, p.pp, p.pp_layers).split("|")


def stage_gpus(recipe: Recipe, stage: str) -> int:
    s = recipe.slurm
    nodes = s.stages[stage].nodes if stage in s.stages and s.stages[stage].nodes else s.nodes
    return nodes * (s.gpus_per_node or s.tasks_per_node)


def plan(recipe: Recipe, stage: str = "pretrain", gpu_gib: float = 80.0, gpus: Optional[int] = None,
         te: Optional[bool] = None, precision: str = "bf16", conv_fused: Optional[bool] = None) -> MemoryPlan:
    """The memory plan of ``stage`` (a training stage) with its own parallelism, on ``gpus`` GPUs
    (default: the recipe's slurm nodes x GPUs per node) of ``gpu_gib`` GiB each. ``conv_fused``: the training
    machine's Mamba conv is causal-conv1d's fused kernel (default: whether it imports here)."""
    if stage not in TRAIN_STAGES:
        raise ValueError(f"the memory plan is for a training stage ({', '.join(TRAIN_STAGES)}), got {stage!r}")
    from pipeline.model.spec import te_available

    cfg = getattr(recipe, stage)
    p, t, m = cfg.parallelism, cfg.training, recipe.model
    te = m.backend != "local" if te is None else te  # auto: a GPU cluster runs TE
    fused_ce = te  # model/build.py fuses the cross entropy with TE on a GPU
    conv_fused = causal_conv1d() if conv_fused is None else conv_fused
    gpus = gpus or stage_gpus(recipe, stage)
    model_ranks = p.tp * p.pp * p.cp
    dp = max(gpus // model_ranks, 1)
    expert_dp = max(gpus // (p.pp * p.ep * p.etp), 1)  # ranks sharing one expert shard (DP x CP / EP)
    elastic = stage in ("stage1", "stage2")
    a = 2.0 if precision == "bf16" else 4.0
    w_b, g_b, o_b = (2.0, 4.0, 12.0) if precision == "bf16" else (4.0, 4.0, 8.0)
    seq, mbs = t.seq_length, t.micro_batch_size
    tokens = mbs * seq / p.cp  # this rank's tokens of one micro-batch
    num_micro = max(t.global_batch_size // (mbs * dp), 1)
    dims = Dims.from_model(m)
    mods = list(p.recompute_modules)

    worst = None
    for index, layers in enumerate(_stage_layers(recipe, p)):
        dense = expert = 0.0
        for sym in layers:
            e = expert_params(recipe, sym)
            dense += layer_params(sym, dims) - e
            expert += e
        first, last = index == 0, index == p.pp - 1
        dense += (m.vocab_size * m.hidden_size if first else 0) + \
            ((0 if m.tie_embeddings and first else m.vocab_size * m.hidden_size) + m.hidden_size if last else 0)
        dense_rank, expert_rank = dense / p.tp, expert / (p.ep * p.etp)
        params = dense_rank + expert_rank
        shard = (dense_rank / dp + expert_rank / expert_dp) if p.distributed_optimizer else params
        lines = [("weights", params * w_b, f"{params / 1e6:,.0f}M params x {w_b:g} B"),
                 ("gradients", params * g_b, f"fp32 DDP buffer x {g_b:g} B"),
                 ("optimizer", shard * o_b, ("distributed over DP " if p.distributed_optimizer else "replicated, ")
                  + f"{o_b:g} B/param (fp32 master + Adam m, v)" if precision == "bf16" else "Adam m, v")]
        if elastic:
            lines.append(("teacher", params * w_b, "frozen parent, same sharding, no grads"))
        inflight = min(p.pp - index, num_micro) if p.pp > 1 else 1
        per_kind: Dict[str, float] = {}
        peak_layer = 0.0
        for sym in layers:
            b = layer_activation_bytes(sym, recipe, p, seq, te, p.recompute, mods, elastic, a, conv_fused)
            per_kind[sym] = per_kind.get(sym, 0.0) + b * tokens
            if p.recompute != "none":  # the layer being recomputed holds its full activations
                full = layer_activation_bytes(sym, recipe, p, seq, te, "none", mods, elastic, a, conv_fused)
                peak_layer = max(peak_layer, full * tokens)
        names = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
        for sym, b in per_kind.items():
            n = layers.count(sym)
            lines.append((f"activations {names[sym]}", b * inflight,
                          f"{n} layers x {inflight} micro-batch(es) x {tokens:,.0f} tokens, recompute {p.recompute}"))
        if peak_layer:
            lines.append(("activations recompute", peak_layer, "one layer re-run in the backward"))
        hs = m.hidden_size / p.tp if p.tp > 1 and p.sequence_parallel else m.hidden_size
        if last:
            logits = tokens * m.vocab_size / p.tp
            final = 2 * hs * a * tokens
            chunk = min(t.kd_chunk_tokens or tokens, tokens)
            if elastic and chunk < tokens:  # chunked KL (elastic/kd.py): student + teacher logits kept, their
                # gradient, and one chunk's fp32 temporaries (student, teacher, their difference) at a time
                lines.append(("kd logits", logits * 3 * a + 3 * 4 * chunk * m.vocab_size / p.tp + final,
                              f"{tokens:,.0f} tokens x {m.vocab_size / p.tp:,.0f} vocab: student+teacher + grad, "
                              f"fp32 KL over {chunk:,.0f}-token chunks"))
            elif elastic:  # student + teacher logits, 3 fp32 terms forward_kl keeps, its fp32 and bf16 gradient
                lines.append(("kd logits", logits * (3 * a + 4 * 4) + final,
                              f"{tokens:,.0f} tokens x {m.vocab_size / p.tp:,.0f} vocab: student+teacher + fp32 KL"))
            elif fused_ce:  # megatron's jit-fused cross entropy (TE on a GPU): the bf16 logits and two fp32
                # buffers at once (its functional fp32 copy, then exp / softmax, which it keeps for the backward)
                lines.append(("lm logits", logits * (a + 4 + 4) + final,
                              f"{tokens:,.0f} tokens x {m.vocab_size / p.tp:,.0f} vocab + 2 fp32 buffers (fused CE)"))
            else:  # logits, their fp32 copy (the vocab-parallel cross entropy's softmax), the logits' gradient
                lines.append(("lm logits", logits * (a + 4 + a) + final,
                              f"{tokens:,.0f} tokens x {m.vocab_size / p.tp:,.0f} vocab + fp32 softmax, grad"))
        if "E" in layers:
            tok = tokens / p.tp if p.tp > 1 and p.sequence_parallel else tokens
            lines.append(("moe dispatch", 2 * tok * m.moe_topk * m.hidden_size * a,
                          f"all-to-all send + receive of {tok * m.moe_topk:,.0f} routed tokens (transient)"))
        if p.pp > 1:
            lines.append(("pipeline buffers", 2 * inflight * tokens * hs * a * (2 if elastic else 1),
                          "p2p activations and their gradients" + (" (student + teacher)" if elastic else "")))
        total = sum(b for _, b, _ in lines)
        if worst is None or total > worst[0]:
            worst = (total, index, lines)
    _, index, lines = worst
    layout = (f"{gpus} GPUs = tp {p.tp} x pp {p.pp} x cp {p.cp} x dp {dp} (ep {p.ep}, etp {p.etp}); "
              f"pipeline stage {index} (the largest); seq {seq} x micro-batch {mbs}, {num_micro} micro-batches")
    return MemoryPlan(stage=stage, gpus=gpus, layout=layout, lines=lines, gpu_gib=gpu_gib)


def format_plan(mp: MemoryPlan) -> str:
    rows = [f"memory plan, {mp.stage}: {mp.layout}"]
    for name, b, note in mp.lines:
        when = f" [{PHASES[name]} phase]" if name in PHASES else ""
        rows.append(f"  {name:<24}{b / GIB:>9.2f} GiB   {note}{when}")
    verdict = "fits" if mp.fits else "does NOT fit"
    rows.append(f"  {'peak':<24}{mp.total / GIB:>9.2f} GiB   stored terms + the larger phase; {verdict} a "
                f"{mp.gpu_gib:g} GiB GPU (keeping {RESERVE:.0%} free: {mp.gpu_gib * (1 - RESERVE):.1f} GiB usable)")
    return "\n".join(rows)
