"""The recipe schema: one typed dataclass per section.

Precedence is defaults < recipe YAML < CLI ``key.path=value`` (see ``load.py``). Every field has a default
so that a recipe only states what differs; the shipped recipes state (and comment) everything.
Training stages carry a partial ``training:`` block that is resolved over the top-level ``training``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class RunConfig:
    name: str = "run"  # run directory name under root
    root: str = "runs"  # run dirs live in <root>/<name>/<stage>/
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class ModelConfig:
    """A hybrid Mamba-2 / attention / MoE language model (Nemotron-H family)."""

    num_layers: int = 3
    pattern: str = "M*E"  # one symbol per layer: M Mamba-2, * attention, E MoE, - dense MLP
    hidden_size: int = 64
    vocab_size: int = 512
    norm_eps: float = 1e-5
    max_sequence_length: int = 8192
    tie_embeddings: bool = False
    init_std: float = 0.02
    # attention (GQA, no position embedding)
    num_attention_heads: int = 4
    num_query_groups: int = 2
    attention_head_dim: int = 16
    # Mamba-2
    mamba_num_heads: int = 8
    mamba_head_dim: int = 16
    mamba_state_dim: int = 16
    mamba_num_groups: int = 2
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128
    # dense MLP layers ('-')
    ffn_hidden_size: int = 128
    activation: str = "squared_relu"  # squared_relu | gelu | silu (non-gated)
    # MoE layers ('E')
    num_experts: int = 8
    moe_ffn_hidden_size: int = 32
    moe_shared_expert_ffn_hidden_size: int = 64  # 0 = no shared expert
    moe_topk: int = 2
    moe_topk_scaling_factor: float = 1.0
    moe_score_function: str = "sigmoid"  # sigmoid | softmax
    moe_expert_bias: bool = True  # aux-loss-free load balancing bias (selection only)
    moe_expert_bias_update_rate: float = 1e-3
    moe_aux_loss_coeff: float = 0.0


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    ep: int = 1  # expert parallel
    cp: int = 1  # context parallel
    sequence_parallel: bool = True  # used whenever tp > 1 (required by MoE under TP)
    pp_layers: List[int] = field(default_factory=list)  # layers per PP stage; [] = balanced
    distributed_optimizer: bool = False
    recompute: str = "none"  # none | full
    moe_token_dispatcher: str = "alltoall"  # alltoall | allgather


@dataclass
class DataSource:
    name: str = ""
    path: str = ""
    format: str = "text"  # text | chat
    text_field: str = "text"
    messages_field: str = "messages"
    weight: float = 1.0


@dataclass
class DataConfig:
    tokenizer: str = ""  # HF tokenizer directory
    sources: List[DataSource] = field(default_factory=list)
    output_dir: str = ""  # default: <root>/<name>/data
    split: str = "98,1,1"  # train,valid,test
    calibration_samples: int = 1024
    num_workers: int = 2


@dataclass
class TrainingConfig:
    data: str = "synthetic"  # synthetic | blend (the data stage's output)
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 512
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    eval_interval: int = 0  # 0 = no periodic validation
    eval_iters: int = 4
    init_from: str = ""  # another stage's name (its latest checkpoint) or a checkpoint path


@dataclass
class CheckpointConfig:
    save_interval: int = 50
    keep_last: int = 2  # 0 keeps all
    async_save: bool = False


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look up the device (H100 bf16: 989)


@dataclass
class ElasticAxes:
    """Choices per elastic axis, largest first; a choice k keeps the prefix [:k] (after importance)."""

    hidden: List[int] = field(default_factory=list)
    attention_heads: List[int] = field(default_factory=list)
    mamba_heads: List[int] = field(default_factory=list)
    ffn: List[int] = field(default_factory=list)  # dense MLP width
    moe_ffn: List[int] = field(default_factory=list)  # routed-expert FFN width
    shared_expert_ffn: List[int] = field(default_factory=list)
    experts: List[int] = field(default_factory=list)
    depth: List[int] = field(default_factory=list)  # number of layers kept


@dataclass
class ElasticBudget:
    name: str = ""
    fraction: float = 1.0  # target active parameters as a fraction of the full model


@dataclass
class ElasticConfig:
    budgets: List[ElasticBudget] = field(default_factory=list)
    axes: ElasticAxes = field(default_factory=ElasticAxes)
    size_multiple: int = 16  # NVFP4 block size; every width choice must be a multiple


@dataclass
class TrainStageConfig:
    """A training stage; ``training`` holds overrides of the top-level ``training`` section."""

    training: TrainingConfig = field(default_factory=TrainingConfig)


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


# Sections whose ``training`` block is resolved over the top-level ``training`` section.
TRAIN_STAGES = ("pretrain",)
