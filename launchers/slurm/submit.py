"""Submit rendered stage jobs with ``sbatch``, each after the previous one (``--dependency=afterok``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Callable, List, Optional, Sequence

from launchers.slurm.render import StageJob, render_stage, stage_nodes
from pipeline.config.schema import Recipe
from pipeline.errors import UserError


def check_stages(stages: Sequence[str]) -> None:
    """Refuse stages ``python -m pipeline`` does not have before anything reaches the queue."""
    from pipeline.cli import STAGES

    for stage in stages:
        if stage not in STAGES:
            raise UserError(f"python -m pipeline: argument STAGE: invalid choice: {stage!r} "
                            f"(choose from {', '.join(STAGES)})")


def check_world(recipe: Recipe, stages: Sequence[str]) -> None:
    """The ranks a job gets must split into the recipe's model-parallel groups."""
    from pipeline.config.load import for_stage

    per_node = recipe.slurm.tasks_per_node
    for stage in stages:
        p = for_stage(recipe, stage).parallelism  # a training stage's own layout
        model_parallel = p.tp * p.pp * p.cp
        nodes = stage_nodes(recipe, stage)
        if (nodes * per_node) % model_parallel:
            raise UserError(f"slurm: stage {stage} gets {nodes} node(s) x {per_node} tasks = {nodes * per_node} "
                            f"ranks, not divisible by parallelism tp*pp*cp = {model_parallel}")


def render_chain(recipe: Recipe, recipe_path: str, stages: Sequence[str],
                 overrides: Sequence[str] = ()) -> List[StageJob]:
    check_stages(stages)
    check_world(recipe, stages)
    return [render_stage(recipe, recipe_path, stage, overrides) for stage in stages]


def dependency_flag(after: Optional[str]) -> List[str]:
    return [f"--dependency=afterok:{after}"] if after else []


def submit_chain(jobs: Sequence[StageJob], after: Optional[str] = None,
                 report: Callable[[str], None] = print) -> List[str]:
    """Write each script beside its log and ``sbatch`` it after the previous job; returns the job ids."""
    sbatch = shutil.which("sbatch")
    if not sbatch:
        raise UserError("sbatch not found on PATH: submit from a SLURM login node (or use --dry-run)")
    ids = []
    for job in jobs:
        os.makedirs(job.log_dir, exist_ok=True)  # SLURM does not create the --output directory
        path = os.path.join(job.log_dir, f"{job.job_name}.sbatch")
        with open(path, "w") as f:
            f.write(job.script)
        cmd = [sbatch, "--parsable", *dependency_flag(after), path]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit code {done.returncode}"]
            raise UserError(f"sbatch {path}: {lines[-1]}")
        after = done.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
        ids.append(after)
        report(f"submitted {job.stage} as job {after}: {path} (log {job.log_dir}/{job.job_name}-{after}.out)")
    return ids
