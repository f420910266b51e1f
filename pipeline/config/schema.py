"""The recipe schema: one typed dataclass per section.

Precedence is defaults < recipe YAML < CLI ``key.path=value`` (see ``load.py``). Every field has a default
so that a recipe only states what differs; the shipped recipes state (and comment) everything.
Training stages carry a partial ``training:`` block that is resolved over the top-level ``training``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from pipeline.config.domain import value


@dataclass
class RunConfig:
    name: str = value("run", name=True)  # run directory name under root
    root: str = "runs"  # run dirs live in <root>/<name>/<stage>/
    seed: int = value(1234, ge=0)
    device: str = value("auto", one_of=("auto", "cpu", "cuda"))


@dataclass
class ModelConfig:
    """A hybrid Mamba-2 / attention / MoE language model (Nemotron-H family)."""

    backend: str = value("auto", one_of=("auto", "te", "local"))  # auto: TE when it imports; local: megatron's layers
    # megatron's memory-efficient Mamba path (fused conv1d + SSD, recomputed in the backward) where its kernels
    # exist (GPU with mamba-ssm and causal-conv1d or its te_kernels stand-in; always off on CPU). Off by default
    # until measured on the GPU (docs/throughput.md)
    mamba_mem_eff_path: bool = False
    # TE's fused grouped expert MLP (megatron's TE op-fuser path: fc1 + weighted squared ReLU + fc2, fewer host
    # launches) for models without elastic masks or quantisers (pretrain, teachers, evaluation): TE backend,
    # squared-ReLU experts, expert TP 1. Off by default until measured on the GPU (docs/throughput.md)
    moe_fused_grouped_mlp: bool = False
    num_layers: int = value(3, ge=1)
    pattern: str = value("M*E", nonempty=True)  # one symbol per layer: M Mamba-2, * attention, E MoE, - dense MLP
    hidden_size: int = value(64, ge=1)
    vocab_size: int = value(512, ge=1)
    norm_eps: float = value(1e-5, gt=0)
    max_sequence_length: int = value(8192, ge=1)
    tie_embeddings: bool = False
    init_std: float = value(0.02, gt=0)
    # attention (GQA, no position embedding)
    num_attention_heads: int = value(4, ge=1)
    num_query_groups: int = value(2, ge=1)
    attention_head_dim: int = value(16, ge=1)
    # Mamba-2
    mamba_num_heads: int = value(8, ge=1)
    mamba_head_dim: int = value(16, ge=1)
    mamba_state_dim: int = value(16, ge=1)
    mamba_num_groups: int = value(2, ge=1)
    mamba_conv_kernel: int = value(4, ge=1)
    mamba_chunk_size: int = value(128, ge=1)
    # dense MLP layers ('-')
    ffn_hidden_size: int = value(128, ge=1)
    activation: str = value("squared_relu", one_of=("squared_relu", "gelu", "silu"))  # non-gated
    # MoE layers ('E')
    num_experts: int = value(8, ge=1)
    moe_ffn_hidden_size: int = value(32, ge=1)
    moe_shared_expert_ffn_hidden_size: int = value(64, ge=0)  # 0 = no shared expert
    moe_topk: int = value(2, ge=1)
    moe_topk_scaling_factor: float = value(1.0, gt=0)
    moe_score_function: str = value("sigmoid", one_of=("sigmoid", "softmax"))
    moe_expert_bias: bool = True  # aux-loss-free load balancing bias (selection only)
    moe_expert_bias_update_rate: float = value(1e-3, ge=0)
    moe_aux_loss_coeff: float = value(0.0, ge=0)


@dataclass
class ParallelConfig:
    tp: int = value(1, ge=1)  # tensor parallel
    pp: int = value(1, ge=1)  # pipeline parallel
    ep: int = value(1, ge=1)  # expert parallel
    etp: int = value(1, ge=1)  # expert TP: TP inside each expert (1 = whole experts, as Megatron-Bridge's Nano)
    cp: int = value(1, ge=1)  # context parallel
    sequence_parallel: bool = True  # used whenever tp > 1 (required by MoE under TP)
    pp_layers: List[int] = value(factory=list, ge=1)  # layers per PP stage; [] = balanced
    distributed_optimizer: bool = False
    # overlap the data-parallel gradient reduction with the backward (bucketed; multi-rank runs)
    overlap_grad_reduce: bool = True
    # distributed optimizer: overlap the parameter all-gather with the next step's forward
    overlap_param_gather: bool = True
    recompute: str = value("none", one_of=("none", "full", "selective"))  # none | full (every layer) | selective
    # (recompute_modules only); docs/memory_plan.md. selective: megatron's core_attn, moe, moe_act (TE grouped GEMM),
    # layernorm, mlp, shared_experts, and mamba (the Mamba mixer, pipeline/model/recompute.py: megatron has none)
    recompute_modules: List[str] = field(default_factory=lambda: ["core_attn"])
    moe_token_dispatcher: str = value("alltoall", one_of=("alltoall", "allgather"))


@dataclass
class DataSource:
    """One input of the blend; the data stage writes it to ``<data dir>/<name>.bin/.idx``."""

    name: str = ""  # file-system-safe, unique; names the output dataset
    path: str = ""  # jsonl/json/parquet/arrow file, a directory of such or of text files, an HF save_to_disk dir
    format: str = value("text", one_of=("text", "chat"))  # text: one field is the document; chat: messages via the chat template
    text_field: str = value("text", nonempty=True)  # record field holding the document (format: text)
    messages_field: str = value("messages", nonempty=True)  # field with [{role, content, [reasoning_content]}] (format: chat)
    hf_split: str = value("train", nonempty=True)  # split to read when path is a saved HF DatasetDict
    weight: float = value(1.0, gt=0)  # blend weight (normalised over sources)
    demo: bool = False  # generated by the data stage from data.demo_corpus (then path must be empty)


@dataclass
class DemoCorpusConfig:
    """The built-in reasoning corpus (arithmetic and list problems with a <think> trace), for demos and tests."""

    records: int = value(0, ge=0)  # records per demo source; 0 = no demo corpus
    seed: int = value(0, ge=0)  # generator seed (each demo source derives its own stream from it)
    vocab_size: int = value(512, ge=1)  # demo BPE vocabulary, special tokens included (<= model.vocab_size)


@dataclass
class DataConfig:
    tokenizer: str = ""  # HF tokenizer directory; "" = train the demo tokenizer into <data dir>/tokenizer
    eod_token: str = ""  # token appended to every document; "" = the tokenizer's eos token
    sources: List[DataSource] = field(default_factory=list)
    output_dir: str = ""  # default: <root>/<name>/data
    split: str = "98,1,1"  # train,valid,test share of each source's documents
    calibration_samples: int = value(1024, ge=0)  # sequences in the importance stage's calibration subset
    calibration_seq_length: int = value(4096, ge=1)  # tokens per calibration sequence (sizes the subset)
    num_workers: int = value(2, ge=0)  # tokenizer worker processes (0 = tokenize in the main process)
    demo_corpus: DemoCorpusConfig = field(default_factory=DemoCorpusConfig)


@dataclass
class TrainingConfig:
    data: str = value("synthetic", one_of=("synthetic", "blend"))  # blend: the data stage's output
    micro_batch_size: int = value(1, ge=1)
    global_batch_size: int = value(8, ge=1)
    seq_length: int = value(512, ge=1)
    train_iters: int = value(100, ge=1)
    lr: float = value(3e-4, gt=0)
    min_lr: float = value(3e-5, ge=0)
    lr_warmup_iters: int = value(0, ge=0)
    lr_decay_style: str = value("cosine", one_of=("cosine", "linear", "constant"))
    weight_decay: float = value(0.0, ge=0)
    adam_beta1: float = value(0.9, ge=0, lt=1)
    adam_beta2: float = value(0.95, ge=0, lt=1)
    adam_eps: float = value(1e-8, gt=0)
    clip_grad: float = value(1.0, ge=0)
    precision: str = value("auto", one_of=("auto", "bf16", "fp32"))  # auto: bf16 on GPU, fp32 on CPU
    fp8: str = value("none", one_of=("none", "delayed", "current", "blockwise"))  # Transformer Engine FP8 recipe (TE backend, Hopper+)
    eval_interval: int = value(0, ge=0)  # 0 = no periodic validation; elastic stages: validation loss per budget
    kd_chunk_tokens: int = value(1024, ge=0)  # elastic KD: tokens per chunk of the vocab-parallel KL (0 = all at once)
    eval_iters: int = value(4, ge=1)
    init_from: str = ""  # another stage's name (its latest checkpoint) or a checkpoint path
    # packed sequences: attention does not cross the end-of-document token (block-causal mask, local backend);
    # Mamba state and conv do cross it (docs/context_parallel.md#packed-sequences)
    document_attention_mask: bool = False


@dataclass
class CheckpointConfig:
    save_interval: int = value(50, ge=0)
    keep_last: int = value(2, ge=0)  # 0 keeps all
    async_save: bool = False  # megatron's async dist-checkpoint save: a forked process writes, training goes on


@dataclass
class LoggingConfig:
    log_interval: int = value(10, ge=1)
    tensorboard: bool = True
    peak_tflops: float = value(0.0, ge=0)  # per device, for MFU; 0 = look up the device (H100 bf16: 989)


@dataclass
class ElasticAxes:
    """Choices per elastic axis, largest first; a choice k keeps the prefix [:k] (after importance)."""

    hidden: List[int] = value(factory=list, ge=1)
    attention_heads: List[int] = value(factory=list, ge=1)
    mamba_heads: List[int] = value(factory=list, ge=1)
    ffn: List[int] = value(factory=list, ge=1)  # dense MLP width
    moe_ffn: List[int] = value(factory=list, ge=1)  # routed-expert FFN width
    shared_expert_ffn: List[int] = value(factory=list, ge=1)
    experts: List[int] = value(factory=list, ge=1)
    depth: List[int] = value(factory=list, ge=1)  # number of layers kept


@dataclass
class ElasticBudget:
    name: str = value("", name=True)
    fraction: float = value(1.0, gt=0, le=1)  # target active parameters as a fraction of the full model


@dataclass
class ElasticConfig:
    budgets: List[ElasticBudget] = field(default_factory=list)
    axes: ElasticAxes = field(default_factory=ElasticAxes)
    size_multiple: int = value(16, ge=1)  # NVFP4 block size; every width choice must be a multiple
    # the router (pipeline/elastic/router.py): one MLP per axis with > 1 choice
    router_hidden: int = value(128, ge=1)  # Linear(n_budgets -> router_hidden) -> LeakyReLU(0.1) -> Linear(-> n_choices)
    router_lr_mult: float = value(100.0, gt=0)  # router LR = training.lr x this
    heterogeneous: bool = False  # per-layer choices for the layer axes (heads, FFN widths, experts)
    tau0: float = value(1.0, gt=0)  # Gumbel-softmax temperature at step 0
    tau_decay: float = value(0.9999, gt=0, le=1)  # tau = tau0 * tau_decay ** step
    logit_scale_start: float = value(1.0, gt=0)  # router logits are multiplied by a factor ramped linearly start -> end
    logit_scale_end: float = value(10.0, gt=0)
    # the budget loss (pipeline/elastic/budget.py)
    budget_loss_alpha: float = value(1.0, ge=0)  # total loss = KD + alpha * budget loss
    target: str = value("active", one_of=("active", "params", "memory"))  # what a budget's fraction is a fraction of
    dead_zone: float = value(0.05, ge=0, lt=1)  # no budget loss while the expected size is within +-dead_zone of the target
    full_budget_penalty: float = value(1.0, ge=0)  # weight of (1 - P/P_full) for the fraction-1 budget (pins it to the parent)
    memory_seq_length: int = value(8192, ge=1)  # target memory: KV cache and SSM state for one sequence of this length
    memory_param_bytes: float = value(2.0, gt=0)  # target memory: bytes per parameter (2 = bf16, 1 = FP8, ~0.56 = NVFP4)
    memory_cache_bytes: float = value(2.0, gt=0)  # target memory: bytes per KV-cache / SSM-state element
    memory_dispatch_tokens: int = value(0, ge=0)  # target memory: tokens of the MoE dispatch buffer (0 = not counted)
    kd_temperature: float = value(1.0, gt=0)  # KD softmax temperature (the loss is scaled by T^2)


@dataclass
class SlurmStageConfig:
    """Per-stage resources that differ from the ``slurm`` defaults (e.g. the data stage on one node)."""

    nodes: int = value(0, ge=0)  # 0 = slurm.nodes
    time: str = ""  # "" = slurm.time


@dataclass
class SlurmConfig:
    """How ``python -m launchers.slurm`` renders launchers/slurm/job.sbatch (srun-native: one task per GPU)."""

    nodes: int = value(1, ge=1)  # nodes per job (--nodes)
    tasks_per_node: int = value(8, ge=1)  # ranks per node (--ntasks-per-node); one per GPU
    gpus_per_node: int = value(8, ge=0)  # --gpus-per-node; 0 = request no GPUs (CPU / gloo jobs)
    cpus_per_task: int = value(16, ge=1)  # --cpus-per-task (data-loader workers live here)
    mem: str = ""  # --mem per node, e.g. "0" = all of it; "" = cluster default
    time: str = "04:00:00"  # wall-clock limit per job (--time); a requeue starts a fresh limit
    account: str = ""  # --account; "" = your default account
    partition: str = ""  # --partition; "" = the cluster's default partition
    qos: str = ""  # --qos; "" = none
    exclusive: bool = True  # --exclusive: no other jobs on our nodes
    job_name: str = ""  # --job-name; "" = <run.name>-<stage>
    workdir: str = ""  # directory the job runs in (holds recipes/ and runs/); "" = where you submit from
    python: str = "python"  # interpreter inside the job (e.g. /path/to/.venv/bin/python)
    container_image: str = ""  # pyxis/enroot image (srun --container-image); "" = run on the host
    container_mounts: List[str] = field(default_factory=list)  # "src:dst" pairs for the container
    env: Dict[str, str] = field(default_factory=dict)  # exported in the job before srun (NCCL_*, HF_HOME, ...)
    setup: List[str] = field(default_factory=list)  # shell lines run before srun (module load, source venv)
    master_addr: str = "first_node"  # first_node = first host of the node list (holds rank 0), or an address
    master_port: int = value(0, ge=0, le=65535)  # 0 = 20000 + job id % 20000 (two jobs sharing a node do not collide)
    signal_seconds: int = value(120, ge=0)  # SIGTERM reaches the ranks this many seconds before the time limit
    max_restarts: int = value(3, ge=0)  # requeues after a SIGTERM-and-checkpoint (time limit or preemption)
    extra_sbatch: List[str] = field(default_factory=list)  # more #SBATCH flags, e.g. "--constraint=h100"
    stages: Dict[str, SlurmStageConfig] = field(default_factory=dict)  # per-stage nodes / time


@dataclass
class TrainStageConfig:
    """A training stage; ``training`` holds overrides of the top-level ``training`` section."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    # overrides of the top-level ``parallelism`` for this stage (e.g. stage2: cp 4 at 49K, stage1: cp 1)
    parallelism: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class ImportanceConfig:
    """The importance stage: score every elastic axis on calibration data, permute the parent (docs/importance.md).

    Calibration samples are split over data-parallel ranks: ``samples`` must be a multiple of
    micro_batch_size x DP size (as must ``depth_samples``)."""

    init_from: str = "pretrain"  # the parent: a stage name (its latest checkpoint) or a checkpoint path
    data: str = value("blend", one_of=("blend", "synthetic"))  # blend: the data stage's calibration subset
    samples: int = value(0, ge=0)  # calibration sequences; 0 = data.calibration_samples
    seq_length: int = value(0, ge=0)  # tokens per sequence; 0 = data.calibration_seq_length
    micro_batch_size: int = value(1, ge=1)  # sequences per forward, per DP rank
    precision: str = value("auto", one_of=("auto", "bf16", "fp32"))  # auto: the parent's stored dtype; also the saved dtype
    depth: bool = False  # also rank layers by iterative normalised-MSE removal (a forward per candidate layer)
    # sequences (the first of the calibration set) re-run for every depth candidate; 0 = all samples.
    # Removal rounds: num_layers - min(elastic.axes.depth), or num_layers - 1 when that axis is empty.
    depth_samples: int = value(8, ge=0)


@dataclass
class ElasticStageConfig(TrainStageConfig):
    """An elastic training stage (stage1, stage2): ``training`` overrides plus how budgets are sampled."""

    budget_weights: List[float] = value(factory=list, ge=0)  # sampling probability per elastic budget; [] = uniform
    teacher: str = "importance"  # the frozen KD teacher: a stage name (its latest checkpoint) or a checkpoint path
    teacher_fp8: bool = True  # with training.fp8: the teacher's forward in FP8 too (false: bf16, the exact targets)
    masks: str = value("hard", one_of=("hard", "soft"))  # hard: argmax, straight-through max(p); soft: Gumbel-softmax mixture


@dataclass
class BudgetEvalConfig:
    """budget-eval: think with one nested budget, answer with another, on held-out problems
    (docs/budget_control.md). Greedy decoding, one problem at a time."""

    checkpoint: str = ""  # the elastic checkpoint directory; "" = <root>/<name>/elastic
    problems: str = ""  # "" = generated by the data stage's reasoning generator; else a JSONL of {prompt, answer}
    num_problems: int = value(32, ge=1)  # problems (the first N of the JSONL)
    seed: int = value(20261203, ge=0)  # generator seed of the held-out problems (refused if a data source uses it)
    think_tokens: int = value(512, ge=1)  # thinking cap of the budget pairs (a trace cut there is closed for the model)
    answer_tokens: int = value(64, ge=1)  # answer tokens at most
    token_budget_caps: List[int] = value(factory=lambda: [64, 128, 256], ge=1)  # the default control: L->L capped
    budgets: List[str] = field(default_factory=list)  # budgets to pair; [] = every homogeneous budget
    device: str = value("auto", one_of=("auto", "cpu", "cuda"))
    dtype: str = value("auto", one_of=("auto", "bf16", "fp32", "fp16"))  # auto: bf16 on GPU, fp32 on CPU
    engine: str = value("views", one_of=("views", "sliced"))  # views: every budget on one copy of the weights; sliced: a contiguous copy per budget
    out: str = ""  # output directory; "" = <root>/<name>/budget_eval


# What stays BF16 by default (HF module-name patterns): the released Nano-3 NVFP4 model's choice -- router,
# LM head, conv1d and the attention projections (and, by qad.keep_mamba_before_attention, the Mamba projections
# of the layers feeding attention)
DEFAULT_QUANT_EXCLUDE = ["lm_head", "*.mixer.gate", "*.mixer.conv1d", "*.mixer.q_proj", "*.mixer.k_proj",
                         "*.mixer.v_proj", "*.mixer.o_proj"]


@dataclass
class QadConfig(TrainStageConfig):
    """Nested quantisation after stage 2 (docs/qad.md): calibration over every budget's subnet (one set of
    scales for all nested models), FP8 PTQ, NVFP4 quantisation-aware distillation at the stage-2 subnets."""

    format: str = value("nvfp4", one_of=("nvfp4", "fp8"))  # the QAD student's format (fp8 is PTQ only, same calibration)
    teacher: str = value("stage2", nonempty=True)  # KD teacher: the BF16 elastic model (stage name or checkpoint path)
    budgets_from: str = value("stage2", nonempty=True)  # the stage whose elastic_budgets.json fixes every subnet
    budget_weights: List[float] = value(factory=list, ge=0)  # sampling probability per budget; [] = stage2's
    exclude: List[str] = value(factory=lambda: list(DEFAULT_QUANT_EXCLUDE))  # HF module names kept BF16 (fnmatch)
    keep_mamba_before_attention: bool = True  # the Mamba in_proj / out_proj of the layer before each attention stay BF16
    activations: bool = True  # also fake-quantise linear inputs (static per-tensor amax from calibration)
    calibration_data: str = value("blend", one_of=("blend", "synthetic"))  # the data stage's calibration subset | synthetic
    calibration_samples: int = value(16, ge=1)  # sequences, each run once per budget
    calibration_seq_length: int = value(0, ge=0)  # 0 = qad.training.seq_length
    kv_cache: str = value("none", one_of=("none", "fp8"))  # the KV-cache dtype the export declares (kv_cache_quant_algo)


@dataclass
class DistillConfig(TrainStageConfig):
    """Prune + distil one fixed smaller model (the sequential-compression baseline, docs/quality.md): the student
    is the permuted parent at one budget's resolved subnet (no router), KD from the frozen parent."""

    budget: str = ""  # the elastic budget whose subnet is trained ("" = refused at run time: name one)
    budgets_from: str = value("stage2", nonempty=True)  # stage name or stage dir whose elastic_budgets.json fixes it
    teacher: str = value("importance", nonempty=True)  # frozen KD teacher: a stage name or checkpoint path
    teacher_fp8: bool = True  # with training.fp8: the teacher's forward in FP8 too (false: bf16, the exact targets)


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallelism: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    pretrain: TrainStageConfig = field(default_factory=TrainStageConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    stage1: ElasticStageConfig = field(default_factory=ElasticStageConfig)
    stage2: ElasticStageConfig = field(default_factory=ElasticStageConfig)
    qad: QadConfig = field(default_factory=QadConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    budget_eval: BudgetEvalConfig = field(default_factory=BudgetEvalConfig)


# Sections whose ``training`` block is resolved over the top-level ``training`` section.
TRAIN_STAGES = ("pretrain", "stage1", "stage2", "qad", "distill")
