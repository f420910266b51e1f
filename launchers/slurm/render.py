"""Render launchers/slurm/job.sbatch for one stage from a recipe's ``slurm:`` block.

Pure text in, text out (no scheduler needed): ``--dry-run`` and the golden test use exactly what ``sbatch`` gets.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from typing import List, Sequence

from pipeline.config.schema import Recipe

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "job.sbatch")
_FIELD = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class StageJob:
    """One rendered stage: what to write and where its log goes."""

    stage: str
    job_name: str
    log_dir: str
    script: str


def stage_nodes(recipe: Recipe, stage: str) -> int:
    per_stage = recipe.slurm.stages.get(stage)
    return per_stage.nodes if per_stage and per_stage.nodes else recipe.slurm.nodes


def stage_time(recipe: Recipe, stage: str) -> str:
    per_stage = recipe.slurm.stages.get(stage)
    return per_stage.time if per_stage and per_stage.time else recipe.slurm.time


def render_stage(recipe: Recipe, recipe_path: str, stage: str, overrides: Sequence[str] = (),
                 template: str = TEMPLATE) -> StageJob:
    s = recipe.slurm
    workdir = os.path.abspath(s.workdir or os.getcwd())
    log_dir = os.path.join(workdir, recipe.run.root, recipe.run.name, "slurm")  # join keeps an absolute root
    job_name = s.job_name or f"{recipe.run.name}-{stage}"
    # slurm.* overrides shape the job, not the stage: keep the stage's command line to what it reads.
    stage_overrides = [o for o in overrides if not o.startswith("slurm.")]
    command = [s.python, "-m", "pipeline", stage, "--recipe", recipe_path, *stage_overrides]
    fields = {
        "recipe": recipe_path,
        "stage": stage,
        "job_name": job_name,
        "nodes": str(stage_nodes(recipe, stage)),
        "tasks_per_node": str(s.tasks_per_node),
        "cpus_per_task": str(s.cpus_per_task),
        "time": stage_time(recipe, stage),
        "workdir": workdir,
        "log_dir": log_dir,
        "signal_seconds": str(s.signal_seconds),
        "max_restarts": str(s.max_restarts),
        "optional_sbatch": "\n".join(f"#SBATCH {flag}" for flag in _optional_sbatch(recipe)),
        "master_addr": '"$MASTER_NODE"' if s.master_addr == "first_node" else shlex.quote(s.master_addr),
        "master_port": str(s.master_port) if s.master_port else "$((20000 + SLURM_JOB_ID % 20000))",
        "env": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in s.env.items()),
        "setup": "\n".join(s.setup),
        "srun_container": "".join(f"{flag} \\\n    " for flag in _container_flags(recipe, workdir)),
        "command": " ".join(shlex.quote(part) for part in command),
    }
    with open(template) as f:
        text = f.read()
    return StageJob(stage, job_name, log_dir, fill(text, fields))


def fill(text: str, fields: dict) -> str:
    """Replace every ``{{name}}``; a line that was only an empty field disappears."""
    unknown = sorted(set(_FIELD.findall(text)) - set(fields))
    if unknown:
        raise KeyError(f"template fields without a value: {', '.join(unknown)}")
    lines = []
    for line in text.splitlines():
        whole = _FIELD.fullmatch(line.strip())
        if whole and not fields[whole.group(1)]:
            continue
        lines.append(_FIELD.sub(lambda m: fields[m.group(1)], line))
    return "\n".join(lines) + "\n"


def _optional_sbatch(recipe: Recipe) -> List[str]:
    s = recipe.slurm
    flags = []
    if s.gpus_per_node:
        flags.append(f"--gpus-per-node={s.gpus_per_node}")
    for name in ("account", "partition", "qos", "mem"):
        if getattr(s, name):
            flags.append(f"--{name}={getattr(s, name)}")
    if s.exclusive:
        flags.append("--exclusive")
    return flags + list(s.extra_sbatch)


def _container_flags(recipe: Recipe, workdir: str) -> List[str]:
    s = recipe.slurm
    if not s.container_image:
        return []
    flags = [f"--container-image={shlex.quote(s.container_image)}"]
    if s.container_mounts:
        flags.append(f"--container-mounts={shlex.quote(','.join(s.container_mounts))}")
    return flags + [f"--container-workdir={shlex.quote(workdir)}"]
