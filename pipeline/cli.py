"""``python -m pipeline <stage> --recipe R.yaml [--dry-run] [key.path=value ...]``

One entry point for every stage. User mistakes print one ``error:`` line and exit 2; the Makefile and the
launchers only call this.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from pipeline.errors import UserError

# stage name -> (module under pipeline.stages, one-line description)
STAGES = {
    "params": ("params", "print total and active parameters per layer kind"),
    "data": ("data", "tokenize the recipe's sources into megatron indexed datasets + blend"),
    "pretrain": ("pretrain", "train the parent as a plain language model"),
    "import": ("import_hf", "convert a Hugging Face NemotronH model into the run's import checkpoint"),
    "importance": ("importance", "score every elastic axis on calibration data and permute the parent"),
    "stage1": ("stage1", "elastic training, stage 1: router + nested masks + KD, budgets sampled uniformly"),
    "stage2": ("stage2", "elastic training, stage 2: long context, weighted budget sampling"),
    "plan": ("plan", "memory plan of a training stage per GPU (params, grads, optimizer, activations) and the verdict"),
    "evaluate": ("evaluate", "validation loss of each nested budget: trained vs untrained slice vs parent"),
    "qad": ("qad", "nested quantisation after stage 2: calibrate (FP8 PTQ scales), NVFP4 QAD at every budget"),
    "distill": ("distill", "prune + distil ONE fixed budget's subnet from the parent (the independent baseline)"),
    "export": ("export", "write a checkpoint as a Hugging Face NemotronH model (safetensors + config.json)"),
    "slice": ("slice", "cut one budget out of an elastic checkpoint as a standalone model"),
    "generate": ("generate", "think with a small budget, answer with a large one (one copy of the weights)"),
    "budget-eval": ("budget_eval", "accuracy and latency of every think/answer budget pair on held-out problems"),
}
RECIPE_OPTIONAL = {"generate"}  # stages that run from a checkpoint directory alone


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        raise UserError(f"{self.prog}: {message}")


def build_parser(stage: str = "") -> argparse.ArgumentParser:
    """Only the chosen stage's module is imported (stages import megatron; ``params`` need not)."""
    parser = _Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", parser_class=_Parser)
    for name, (module, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--recipe", required=name not in RECIPE_OPTIONAL, default="",
                       help="recipe YAML (recipes/*.yaml)" + (" (optional)" if name in RECIPE_OPTIONAL else ""))
        p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
        add = getattr(_stage_module(module), "add_arguments", None) if name == stage else None
        if add:
            add(p)
    return parser


def _stage_module(module: str):
    return importlib.import_module(f"pipeline.stages.{module}")


def quiet_libraries() -> None:
    """megatron-core warns about every missing optional kernel (TE, apex) on import; keep our log readable.
    PIPELINE_DEBUG=1 shows everything."""
    if os.environ.get("PIPELINE_DEBUG"):
        return
    warnings.filterwarnings("ignore", module=r"(megatron|torch|transformers|modelopt)\b.*")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None) -> None:
    quiet_libraries()
    try:
        run(argv)
    except UserError as e:
        text = " ".join(str(e).split())  # one line, whatever the message held
        print(f"error: {text}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def run(argv=None) -> None:
    from pipeline.config import dump_recipe, load_recipe
    from pipeline.config.load import for_stage

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), ""))
    args = parser.parse_args(argv)
    if not args.stage:
        parser.print_help()
        raise UserError("no stage given")
    if not args.recipe:  # a RECIPE_OPTIONAL stage without one
        if args.overrides or args.dry_run:
            raise UserError(f"{args.stage}: recipe overrides and --dry-run need --recipe")
        _stage_module(STAGES[args.stage][0]).main(None, args)
        return
    recipe = for_stage(load_recipe(args.recipe, args.overrides), args.stage)  # the stage's own parallelism
    if args.dry_run:
        print(f"# resolved recipe for stage '{args.stage}' from {args.recipe}")
        print(dump_recipe(recipe), end="")
        check = getattr(_stage_module(STAGES[args.stage][0]), "dry_run", None)
        if check:
            check(recipe, args)
        from pipeline.config.schema import TRAIN_STAGES

        if args.stage in TRAIN_STAGES:
            from pipeline.stages.plan import print_plan

            print_plan(recipe, args.stage)
        return
    _stage_module(STAGES[args.stage][0]).main(recipe, args)
