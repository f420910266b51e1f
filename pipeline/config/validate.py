"""Checks that run before anything heavy: each failure is one ``UserError`` line naming the key."""

from __future__ import annotations

import os
import re

from pipeline.config.parallel_checks import check_stage_layouts, validate_stage_layouts
from pipeline.config.domain import check_domains
from pipeline.config.schema import TRAIN_STAGES, Recipe
from pipeline.errors import UserError

LAYER_SYMBOLS = {"M": "Mamba-2", "*": "attention", "E": "MoE", "-": "dense MLP"}
CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "model.backend": ("auto", "te", "local"),
    "model.activation": ("squared_relu", "gelu", "silu"),
    "model.moe_score_function": ("sigmoid", "softmax"),
    "parallelism.recompute": ("none", "full", "selective"),
    "parallelism.moe_token_dispatcher": ("alltoall", "allgather"),
}
TRAINING_CHOICES = {
    "data": ("synthetic", "blend"),
    "precision": ("auto", "bf16", "fp32"),
    "lr_decay_style": ("cosine", "linear", "constant"),
    "fp8": ("none", "delayed", "current", "blockwise"),
}


def validate(recipe: Recipe, source: str = "<recipe>", stage_layouts: bool = True) -> None:
    def fail(msg: str):
        raise UserError(f"{source}: {msg}")

    def get(path: str):
        obj = recipe
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    check_domains(recipe, fail=fail)  # each key's own domain (schema.py), then the relations below
    _validate_relations(recipe, fail)
    for path, allowed in CHOICES.items():
        if get(path) not in allowed:
            fail(f"{path} = {get(path)!r}, expected one of {', '.join(allowed)}")

    m, p = recipe.model, recipe.parallelism
    bad = sorted({s for s in m.pattern if s not in LAYER_SYMBOLS})
    if bad:
        fail(f"model.pattern has unknown layer symbol(s) {''.join(bad)!r}; "
             f"use {', '.join(f'{k} ({v})' for k, v in LAYER_SYMBOLS.items())}; "
             "pipeline stages come from parallelism.pp_layers, not '|'")
    if len(m.pattern) != m.num_layers:
        fail(f"model.pattern has {len(m.pattern)} layers but model.num_layers = {m.num_layers}")
    for name in ("hidden_size", "vocab_size", "num_layers"):
        if getattr(m, name) <= 0:
            fail(f"model.{name} must be positive")
    if "*" in m.pattern:
        _divides(fail, m.num_query_groups, m.num_attention_heads,
                 "model.num_query_groups", "model.num_attention_heads")
    if "M" in m.pattern:
        _divides(fail, m.mamba_num_groups, m.mamba_num_heads, "model.mamba_num_groups", "model.mamba_num_heads")
    if "E" in m.pattern:
        if not 1 <= m.moe_topk <= m.num_experts:
            fail(f"model.moe_topk = {m.moe_topk} must be in [1, model.num_experts = {m.num_experts}]")

    for name in ("tp", "pp", "ep", "etp", "cp"):
        if getattr(p, name) < 1:
            fail(f"parallelism.{name} must be >= 1")
    if p.tp > 1:
        if "*" in m.pattern:
            _divides(fail, p.tp, m.num_attention_heads, "parallelism.tp", "model.num_attention_heads")
            _divides(fail, p.tp, m.num_query_groups, "parallelism.tp", "model.num_query_groups")
        if "M" in m.pattern:
            _divides(fail, p.tp, m.mamba_num_heads, "parallelism.tp", "model.mamba_num_heads")
            _divides(fail, p.tp, m.mamba_num_groups, "parallelism.tp", "model.mamba_num_groups")
        if "-" in m.pattern:
            _divides(fail, p.tp, m.ffn_hidden_size, "parallelism.tp", "model.ffn_hidden_size")
        _divides(fail, p.tp, m.vocab_size, "parallelism.tp", "model.vocab_size")
    if p.etp > 1:
        if "E" not in m.pattern:
            fail("parallelism.etp > 1 but model.pattern has no MoE layer ('E')")
        _divides(fail, p.etp, m.moe_ffn_hidden_size, "parallelism.etp", "model.moe_ffn_hidden_size")
    if p.ep > 1:
        if "E" not in m.pattern:
            fail("parallelism.ep > 1 but model.pattern has no MoE layer ('E')")
        _divides(fail, p.ep, m.num_experts, "parallelism.ep", "model.num_experts")
    if p.pp > m.num_layers:
        fail(f"parallelism.pp = {p.pp} exceeds model.num_layers = {m.num_layers}")
    if p.pp_layers:
        if len(p.pp_layers) != p.pp or sum(p.pp_layers) != m.num_layers or min(p.pp_layers) < 1:
            fail(f"parallelism.pp_layers = {p.pp_layers} must have pp = {p.pp} positive entries "
                 f"summing to model.num_layers = {m.num_layers}")

    for stage in TRAIN_STAGES:
        t = getattr(recipe, stage).training
        for key, allowed in TRAINING_CHOICES.items():
            if getattr(t, key) not in allowed:
                fail(f"{stage}.training.{key} = {getattr(t, key)!r}, expected one of {', '.join(allowed)}")
        if t.lr_warmup_iters and t.lr_warmup_iters >= t.train_iters:
            fail(f"{stage}.training.lr_warmup_iters = {t.lr_warmup_iters} must be below train_iters = {t.train_iters}")
        if t.global_batch_size % t.micro_batch_size:
            fail(f"{stage}.training.global_batch_size = {t.global_batch_size} is not a multiple of "
                 f"micro_batch_size = {t.micro_batch_size}")
        if t.seq_length > m.max_sequence_length:
            fail(f"{stage}.training.seq_length = {t.seq_length} exceeds "
                 f"model.max_sequence_length = {m.max_sequence_length}")
        if t.fp8 != "none" and m.backend == "local":
            fail(f"{stage}.training.fp8 = {t.fp8} needs the Transformer Engine backend, but model.backend = local")
        if t.fp8 != "none" and t.precision == "fp32":
            fail(f"{stage}.training.fp8 = {t.fp8} trains with bf16 weights: set {stage}.training.precision to auto or bf16")

    check_stage_layouts(recipe, fail)  # CP, recompute, packed sequences: per stage (parallel_checks.py)
    if stage_layouts:
        validate_stage_layouts(recipe, source)
    _validate_data(recipe, fail)

    _validate_elastic(recipe, fail)
    _validate_importance(recipe, fail)
    _validate_slurm(recipe, fail)
    from pipeline.quant.spec import validate_qad

    validate_qad(recipe, fail)


def _validate_relations(recipe: Recipe, fail) -> None:
    """Relations between keys that no single key's domain expresses."""
    for stage in TRAIN_STAGES:
        t = getattr(recipe, stage).training
        if t.min_lr > t.lr:
            fail(f"{stage}.training.min_lr = {t.min_lr:g} exceeds lr = {t.lr:g}")
    fractions = [b.fraction for b in recipe.elastic.budgets]
    if len(set(fractions)) != len(fractions):
        dup = next(f for f in fractions if fractions.count(f) > 1)
        fail(f"elastic.budgets: two budgets have fraction {dup:g} (each budget needs its own size)")
    m = recipe.model
    if m.num_query_groups > m.num_attention_heads:
        fail(f"model.num_query_groups = {m.num_query_groups} exceeds model.num_attention_heads = "
             f"{m.num_attention_heads}")


DATA_FORMATS = ("text", "chat")
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _validate_data(recipe: Recipe, fail) -> None:
    d = recipe.data
    if d.tokenizer and not os.path.isdir(d.tokenizer):
        fail(f"data.tokenizer: directory not found: {d.tokenizer}")
    parts = d.split.split(",")
    try:
        shares = [float(x) for x in parts]
    except ValueError:
        shares = []
    if len(shares) != 3 or min(shares) < 0 or shares[0] <= 0:
        fail(f"data.split = {d.split!r} must be three non-negative numbers train,valid,test with train > 0")
    for key in ("calibration_samples", "num_workers", "demo_corpus.records"):
        if _get(d, key) < 0:
            fail(f"data.{key} must be >= 0")
    if d.calibration_seq_length < 1:
        fail("data.calibration_seq_length must be >= 1")
    if not 0 < d.demo_corpus.vocab_size <= recipe.model.vocab_size:
        fail(f"data.demo_corpus.vocab_size = {d.demo_corpus.vocab_size} must be in "
             f"[1, model.vocab_size = {recipe.model.vocab_size}]")
    names = set()
    for i, src in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if not _SOURCE_NAME.match(src.name):
            fail(f"{key}.name = {src.name!r} must be a file-system-safe name (letters, digits, _ . -)")
        if src.name in names:
            fail(f"{key}.name = {src.name!r} is used twice")
        names.add(src.name)
        if src.format not in DATA_FORMATS:
            fail(f"{key}.format = {src.format!r}, expected one of {', '.join(DATA_FORMATS)}")
        if not src.weight > 0:
            fail(f"{key}.weight = {src.weight} must be > 0")
        if src.demo:
            # demo sources are generated by the data stage into <data dir>/demo/<name>.jsonl
            if src.path:
                fail(f"{key}.path must be empty for a demo source (it is generated into the data dir)")
            if d.demo_corpus.records < 1:
                fail(f"{key} is a demo source but data.demo_corpus.records = {d.demo_corpus.records}")
        elif not src.path:
            fail(f"{key}.path is empty (set it, or demo: true for the generated demo corpus)")
        elif not os.path.exists(src.path):
            fail(f"{key}.path: file not found: {src.path!r}")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _validate_elastic(recipe: Recipe, fail) -> None:
    m, p, e = recipe.model, recipe.parallelism, recipe.elastic
    full = {
        "hidden": m.hidden_size,
        "attention_heads": m.num_attention_heads,
        "mamba_heads": m.mamba_num_heads,
        "ffn": m.ffn_hidden_size,
        "moe_ffn": m.moe_ffn_hidden_size,
        "shared_expert_ffn": m.moe_shared_expert_ffn_hidden_size,
        "experts": m.num_experts,
        "depth": m.num_layers,
    }
    widths = ("hidden", "ffn", "moe_ffn", "shared_expert_ffn")
    for axis, largest in full.items():
        choices = getattr(e.axes, axis)
        key = f"elastic.axes.{axis}"
        if not choices:
            continue
        if choices != sorted(choices, reverse=True) or len(set(choices)) != len(choices):
            fail(f"{key} = {choices} must be distinct and largest first")
        if choices[0] != largest:
            fail(f"{key}[0] = {choices[0]} must be the full size {largest}")
        for c in choices:
            if c <= 0:
                fail(f"{key} has a non-positive choice {c}")
            if axis in widths and c % e.size_multiple:
                fail(f"{key} choice {c} is not a multiple of elastic.size_multiple = {e.size_multiple}")
            if axis in widths + ("attention_heads", "mamba_heads") and axis != "moe_ffn" and c % p.tp:
                fail(f"{key} choice {c} is not a multiple of parallelism.tp = {p.tp}")
            if axis == "moe_ffn" and c % p.etp:  # routed experts are split by expert-TP, not TP
                fail(f"{key} choice {c} is not a multiple of parallelism.etp = {p.etp}")
            if axis == "attention_heads" and c % m.num_query_groups:
                fail(f"{key} choice {c} is not a multiple of model.num_query_groups = {m.num_query_groups}")
            if axis == "mamba_heads" and c % m.mamba_num_groups:
                fail(f"{key} choice {c} is not a multiple of model.mamba_num_groups = {m.mamba_num_groups}")
            if axis == "experts" and (c < m.moe_topk or c % p.ep):
                fail(f"{key} choice {c} must be >= model.moe_topk and a multiple of parallelism.ep")
    names = [b.name for b in e.budgets]
    if len(set(names)) != len(names) or any(not n for n in names):
        fail("elastic.budgets need distinct, non-empty names")
    for i, b in enumerate(e.budgets):
        if not 0 < b.fraction <= 1:
            fail(f"elastic.budgets[{i}].fraction = {b.fraction} must be in (0, 1]")
    _validate_elastic_training(recipe, fail)
    for stage in ELASTIC_STAGES:
        st = getattr(recipe, stage)
        if st.masks not in MASK_MODES:
            fail(f"{stage}.masks = {st.masks!r}, expected one of {', '.join(MASK_MODES)}")
        if not st.teacher:
            fail(f"{stage}.teacher is empty: name the teacher's stage (importance) or a checkpoint path")
        w = st.budget_weights
        if w and (len(w) != len(e.budgets) or min(w) < 0 or sum(w) <= 0):
            fail(f"{stage}.budget_weights = {w} needs one non-negative weight per elastic budget "
                 f"({len(e.budgets)}) with a positive sum ([] = uniform)")


ELASTIC_STAGES = ("stage1", "stage2")
MASK_MODES = ("hard", "soft")


def check_elastic_run(recipe: Recipe, stage: str) -> None:
    """What an elastic training stage needs beyond a valid recipe (run before megatron is imported)."""
    e, p = recipe.elastic, recipe.parallelism
    where = f"{stage}:"
    if not e.budgets or not any(len(getattr(e.axes, a)) > 1 for a in vars(e.axes)):
        raise UserError(f"{where} elastic.budgets and at least one elastic.axes entry with > 1 choice are needed")
    if p.tp > 1 and not p.sequence_parallel:
        # the router's gradient is summed over TP ranks: each must hold a distinct part of the residual stream
        raise UserError(f"{where} parallelism.tp = {p.tp} needs parallelism.sequence_parallel = true")
    if p.cp > 1 and len(e.axes.mamba_heads) > 1:
        raise UserError(f"{where} parallelism.cp = {p.cp} with elastic Mamba heads: megatron's Mamba context "
                        f"parallelism re-shards heads across CP ranks; use cp = 1 or a fixed Mamba width")


ELASTIC_TARGETS = ("active", "params", "memory")
# key -> (lowest allowed, whether the bound itself is allowed)
_ELASTIC_BOUNDS = {
    "router_hidden": (1, True), "router_lr_mult": (0, False), "tau0": (0, False), "tau_decay": (0, False),
    "logit_scale_start": (0, False), "logit_scale_end": (0, False), "budget_loss_alpha": (0, True),
    "dead_zone": (0, True), "full_budget_penalty": (0, True), "memory_seq_length": (1, True),
    "memory_param_bytes": (0, False), "memory_cache_bytes": (0, False), "memory_dispatch_tokens": (0, True),
    "kd_temperature": (0, False),
}


def _validate_elastic_training(recipe: Recipe, fail) -> None:
    """The router, budget-loss and KD keys; the budgets must be reachable with the axes' choices."""
    m, e = recipe.model, recipe.elastic
    if e.target not in ELASTIC_TARGETS:
        fail(f"elastic.target = {e.target!r}, expected one of {', '.join(ELASTIC_TARGETS)}")
    for key, (low, inclusive) in _ELASTIC_BOUNDS.items():
        v = getattr(e, key)
        if v < low or (v == low and not inclusive):
            fail(f"elastic.{key} = {v} must be {'>=' if inclusive else '>'} {low}")
    if e.tau_decay > 1 or e.dead_zone >= 1:
        fail("elastic.tau_decay must be <= 1 and elastic.dead_zone < 1")
    if len(e.axes.experts) > 1 and m.moe_aux_loss_coeff > 0:
        fail("elastic.axes.experts needs model.moe_aux_loss_coeff = 0 (no load-balancing loss under expert masks)")
    if not e.budgets or not any(len(getattr(e.axes, a)) > 1 for a in vars(e.axes)):
        return
    from pipeline.elastic.budget import smallest_fraction

    smallest = smallest_fraction(m, e)
    for i, b in enumerate(e.budgets):
        if b.fraction * (1 + e.dead_zone) < smallest:
            fail(f"elastic.budgets[{i}].fraction = {b.fraction} is out of reach: the smallest choice of every "
                 f"axis gives {smallest:.3f} of the parent's {e.target} size")


IMPORTANCE_CHOICES = {"data": ("blend", "synthetic"), "precision": ("auto", "bf16", "fp32")}


def _validate_importance(recipe: Recipe, fail) -> None:
    imp, m, p = recipe.importance, recipe.model, recipe.parallelism
    if not imp.init_from:
        fail("importance.init_from is empty: name the parent's stage (e.g. pretrain, import) or a checkpoint path")
    for key, allowed in IMPORTANCE_CHOICES.items():
        if getattr(imp, key) not in allowed:
            fail(f"importance.{key} = {getattr(imp, key)!r}, expected one of {', '.join(allowed)}")
    for key in ("samples", "seq_length", "depth_samples"):
        if getattr(imp, key) < 0:
            fail(f"importance.{key} must be >= 0 (0 = the default)")
    if imp.micro_batch_size < 1:
        fail("importance.micro_batch_size must be >= 1")
    samples = imp.samples or recipe.data.calibration_samples
    seq = imp.seq_length or recipe.data.calibration_seq_length
    micro = min(imp.micro_batch_size, samples) if samples else imp.micro_batch_size  # as calibration_plan
    if samples % micro:
        fail(f"importance.samples = {samples} is not a multiple of importance.micro_batch_size = {micro}")
    if seq > m.max_sequence_length:
        fail(f"importance.seq_length = {seq} exceeds model.max_sequence_length = {m.max_sequence_length}")
    if p.tp > 1 and p.sequence_parallel and seq % p.tp:
        fail(f"importance.seq_length = {seq} must be a multiple of parallelism.tp = {p.tp} (sequence parallel)")
    if imp.depth and imp.samples and imp.depth_samples > samples:  # an explicit contradiction; else clamped
        fail(f"importance.depth_samples = {imp.depth_samples} exceeds the {samples} calibration samples")


# Stage names a recipe's slurm.stages may name (the launchers' stage targets; pipeline/cli.py implements them).
SLURM_STAGE_NAMES = ("data", "import", "importance", "pretrain", "stage1", "stage2", "evaluate", "qad", "export")
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")  # [D-]HH[:MM[:SS]] or minutes
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _validate_slurm(recipe: Recipe, fail) -> None:
    s = recipe.slurm
    for name in ("nodes", "tasks_per_node", "cpus_per_task"):
        if getattr(s, name) < 1:
            fail(f"slurm.{name} must be >= 1")
    if s.gpus_per_node not in (0, s.tasks_per_node):
        fail(f"slurm.gpus_per_node = {s.gpus_per_node} must be 0 (CPU job) or slurm.tasks_per_node = "
             f"{s.tasks_per_node} (srun-native: one task per GPU)")
    if not _SLURM_TIME.match(s.time):
        fail(f"slurm.time = {s.time!r} is not a SLURM time ([D-]HH:MM:SS)")
    if s.signal_seconds < 0 or s.max_restarts < 0:
        fail("slurm.signal_seconds and slurm.max_restarts must be >= 0")
    if not 0 <= s.master_port < 65536:
        fail(f"slurm.master_port = {s.master_port} is not a port (0 = derive from the job id)")
    if not s.master_addr or any(c.isspace() for c in s.master_addr):
        fail(f"slurm.master_addr = {s.master_addr!r}: use first_node or one host name / address")
    if not s.python.strip():
        fail("slurm.python must name the interpreter to run in the job")
    for key in s.env:
        if not _ENV_NAME.match(key):
            fail(f"slurm.env.{key} is not a valid environment variable name")
    for i, mount in enumerate(s.container_mounts):
        if ":" not in mount or "," in mount:
            fail(f"slurm.container_mounts[{i}] = {mount!r} must be one src:dst[:flags] pair")
    for i, flag in enumerate(s.extra_sbatch):
        if not flag.startswith("--"):
            fail(f"slurm.extra_sbatch[{i}] = {flag!r} must be an sbatch flag such as --constraint=h100")
    for stage, res in s.stages.items():
        if stage not in SLURM_STAGE_NAMES:
            fail(f"slurm.stages.{stage}: unknown stage; expected one of {', '.join(SLURM_STAGE_NAMES)}")
        if res.nodes < 0:
            fail(f"slurm.stages.{stage}.nodes must be >= 0 (0 = slurm.nodes)")
        if res.time and not _SLURM_TIME.match(res.time):
            fail(f"slurm.stages.{stage}.time = {res.time!r} is not a SLURM time ([D-]HH:MM:SS)")


def _divides(fail, d: int, n: int, dname: str, nname: str) -> None:
    if d <= 0 or n % d:
        fail(f"{dname} = {d} does not divide {nname} = {n}")
