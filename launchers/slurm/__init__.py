"""SLURM launcher: render launchers/slurm/job.sbatch from a recipe's ``slurm:`` block and submit chained jobs."""

from launchers.slurm.render import StageJob, render_stage
from launchers.slurm.submit import render_chain, submit_chain

__all__ = ["StageJob", "render_stage", "render_chain", "submit_chain"]
