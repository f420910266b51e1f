"""``plan`` stage: the memory plan of a training stage per GPU, and whether it fits (docs/memory_plan.md).

    python -m pipeline plan --recipe R [--stage stage2] [--gpu-gib 80] [--gpus N]

Also printed by ``--dry-run`` of pretrain, stage1 and stage2. Computed from shapes alone: nothing is built.
"""

from pipeline.config.schema import TRAIN_STAGES
from pipeline.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--stage", dest="plan_stage", default="pretrain", help=f"training stage to plan: {', '.join(TRAIN_STAGES)}")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB (H100: 80)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs of the job (default: slurm nodes x GPUs/node)")


def print_plan(recipe, stage: str, gpu_gib: float = 80.0, gpus: int = 0) -> bool:
    from pipeline.model.memory_plan import format_plan, plan

    mp = plan(recipe, stage, gpu_gib=gpu_gib, gpus=gpus or None)
    print(format_plan(mp))
    return mp.fits


def main(recipe, args) -> None:
    if args.plan_stage not in TRAIN_STAGES:
        raise UserError(f"plan --stage {args.plan_stage!r}: expected one of {', '.join(TRAIN_STAGES)}")
    if args.gpu_gib <= 0 or args.gpus < 0:
        raise UserError("plan: --gpu-gib must be > 0 and --gpus >= 0")
    print_plan(recipe, args.plan_stage, args.gpu_gib, args.gpus)


def dry_run(recipe, args) -> None:
    main(recipe, args)
