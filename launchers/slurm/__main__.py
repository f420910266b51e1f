"""``python -m launchers.slurm STAGE [STAGE ...] --recipe R.yaml [--dry-run] [--after JOBID] [key.path=value ...]``

Renders launchers/slurm/job.sbatch for each stage from the recipe's ``slurm:`` block and submits the stages as a
chain (each ``--dependency=afterok`` on the one before). ``--dry-run`` prints the scripts and submits nothing.
The overrides go to the recipe (``slurm.nodes=2`` changes the job) and to every stage's command line.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m launchers.slurm", description=__doc__.splitlines()[2])
    parser.add_argument("items", nargs="+", metavar="STAGE|key.path=value",
                        help="stages to run in order, then recipe overrides")
    parser.add_argument("--recipe", required=True, help="recipe YAML (recipes/*.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit nothing")
    parser.add_argument("--after", metavar="JOBID", help="make the first stage wait for this job (afterok)")
    return parser


def run(argv=None) -> None:
    from launchers.slurm.submit import dependency_flag, render_chain, submit_chain
    from pipeline.config import load_recipe

    args = build_parser().parse_intermixed_args(argv)
    stages = [item for item in args.items if "=" not in item]
    overrides = [item for item in args.items if "=" in item]
    if not stages:
        raise UserError("python -m launchers.slurm: name at least one stage")
    recipe = load_recipe(args.recipe, overrides)
    jobs = render_chain(recipe, args.recipe, stages, overrides)
    if not args.dry_run:
        submit_chain(jobs, after=args.after)
        return
    after = args.after
    for job in jobs:
        dep = " ".join(dependency_flag(after))
        # the header goes to stderr so that stdout of a one-stage dry run is the script itself
        print(f"# ---- stage {job.stage}: sbatch --parsable {dep + ' ' if dep else ''}{job.job_name}.sbatch",
              file=sys.stderr, flush=True)
        print(job.script, end="", flush=True)
        after = f"<job id of {job.stage}>"


def main(argv=None) -> None:
    try:
        run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
