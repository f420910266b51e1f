"""The same stage jobs through nemo-run, for users who prefer it: ``SlurmExecutor`` (srun-native, like
launchers/slurm/job.sbatch) or ``LocalExecutor`` (torchrun). Stages chain with nemo-run's ``afterok``
dependencies.

    python -m launchers.nemo STAGE [STAGE ...] --recipe R.yaml [--executor slurm|local] [--nproc N] [--dry-run]
                             [key.path=value ...]

Submission is from a login node (``LocalTunnel``); for SSH submission replace the tunnel in ``slurm_executor``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from typing import List, Sequence

from launchers.slurm.render import stage_nodes, stage_time
from pipeline.config.schema import Recipe
from pipeline.errors import UserError

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "checkpointed on SIGTERM", which nemo-run requeues while retries remain


def stage_script(recipe: Recipe, recipe_path: str, stage: str, overrides: Sequence[str], workdir: str,
                 python: str, requeue_on_sigterm: bool) -> str:
    """The per-rank shell script: cd to the checkout, run the stage, map the preemption marker to exit 75."""
    stage_overrides = [o for o in overrides if not o.startswith("slurm.")]
    command = shlex.join([python, "-m", "pipeline", stage, "--recipe", recipe_path, *stage_overrides])
    lines = [f"cd {shlex.quote(workdir)} || exit 1"]
    if not requeue_on_sigterm:
        return "\n".join(lines + [f"exec {command}", ""])
    return "\n".join(lines + [
        # SIGTERM reaches every process of the step: this shell and tee ignore it (python inherits that until
        # the training loop installs its handler), so the stage can checkpoint and print its marker
        "trap '' TERM",
        # the stage exits 0 after its SIGTERM checkpoint; nemo-run requeues only non-zero exits
        'log=$(mktemp)',
        f'{command} 2>&1 | tee "$log"',
        'rc=${PIPESTATUS[0]}',
        f'if [ "$rc" -eq 0 ] && grep -q "preempted: saved iter" "$log"; then rc={PREEMPTED_EXIT}; fi',
        'rm -f "$log"',
        'exit "$rc"',
        "",
    ])


def slurm_executor(recipe: Recipe, stage: str, job_dir: str):
    import nemo_run as run
    from nemo_run.core.packaging.base import Packager
    from nemo_run.core.tunnel.client import LocalTunnel

    s = recipe.slurm
    master_addr = '"$MASTER_NODE"' if s.master_addr == "first_node" else shlex.quote(s.master_addr)
    master_port = str(s.master_port) if s.master_port else "$((20000 + SLURM_JOB_ID % 20000))"
    setup = [
        # srun-native env:// rendezvous, as in launchers/slurm/job.sbatch: rank 0 runs on the first node
        'export MASTER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_ADDR={master_addr}",
        f"export MASTER_PORT={master_port}",
        *s.setup,
    ]
    extra = {"requeue": True, "kill_on_invalid_dep": "yes"}
    for flag in s.extra_sbatch:  # "--constraint=h100" -> constraint: h100; "--no-kill" -> no_kill: True
        name, _, value = flag[2:].partition("=")
        extra[name.replace("-", "_")] = value or True
    if s.qos:
        extra["qos"] = s.qos
    executor = run.SlurmExecutor(
        account=s.account or None,
        job_name_prefix=f"{recipe.run.name}-",  # jobs named <run.name>-<stage>, as with launchers.slurm
        partition=s.partition or None,
        nodes=stage_nodes(recipe, stage),
        ntasks_per_node=s.tasks_per_node,
        gpus_per_node=s.gpus_per_node or None,
        cpus_per_task=s.cpus_per_task,
        mem=s.mem or None,
        exclusive=s.exclusive or None,
        time=stage_time(recipe, stage),
        signal=f"TERM@{s.signal_seconds}",
        container_image=s.container_image or None,
        container_mounts=list(s.container_mounts),
        env_vars=dict(s.env),
        setup_lines="\n".join(setup),
        additional_parameters=extra,
        # the same directory as the Experiment's local one (base_dir/experiments): sbatch reads scripts from it
        tunnel=LocalTunnel(job_dir=os.path.join(job_dir, "experiments")),
        packager=Packager(),  # run from the checkout in slurm.workdir, not from a git archive
        launcher=None,  # srun-native: one task per GPU
    )
    executor.retries = s.max_restarts
    return executor


def local_executor(nproc: int):
    import nemo_run as run

    # nemo-run starts `torchrun` by name: use the one beside this interpreter (a venv need not be on PATH)
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return run.LocalExecutor(ntasks_per_node=nproc, launcher="torchrun" if nproc > 1 else None)


def run_stages(recipe: Recipe, recipe_path: str, stages: Sequence[str], overrides: Sequence[str],
               executor: str = "slurm", nproc: int = 1, dry_run: bool = False) -> List[str]:
    """Add one task per stage (each ``afterok`` on the previous on SLURM) and launch them, or with ``dry_run``
    return, per stage, what it would submit (the sbatch script on SLURM) and the script every rank runs."""
    import nemo_run as run

    s = recipe.slurm
    workdir = os.path.abspath(s.workdir or os.getcwd())
    # not ".../nemo_run": nemo-run rewrites every "/nemo_run" in paths (its container mount point)
    job_dir = os.path.join(workdir, recipe.run.root, recipe.run.name, "nemo")
    on_slurm = executor == "slurm"
    with run.Experiment(f"{recipe.run.name}-{'-'.join(stages)}", base_dir=job_dir, log_level="WARN") as exp:
        previous: List[str] = []
        rank_scripts: List[str] = []
        for stage in stages:
            text = stage_script(recipe, recipe_path, stage, overrides, workdir,
                                s.python if on_slurm else sys.executable, on_slurm)
            rank_scripts.append(text)
            script = run.Script(inline=text)
            task_executor = slurm_executor(recipe, stage, job_dir) if on_slurm else local_executor(nproc)
            previous = [exp.add(script, executor=task_executor, name=stage, tail_logs=False,
                                dependencies=previous if on_slurm else None)]
        if dry_run:
            exp.dryrun(log=False)
            submits = [str(job._dryrun_info) for job in exp.jobs]  # nemo-run 0.11 keeps the request here
            return [f"{sub}\n# every rank runs scripts/{stage}.sh:\n" + "".join(f"#   {line}\n" for line in text.splitlines())
                    for stage, sub, text in zip(stages, submits, rank_scripts)]
        exp.run(sequential=not on_slurm, detach=on_slurm, tail_logs=not on_slurm)  # SLURM: submit and return
    return []


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def main(argv=None) -> None:
    parser = _Parser(prog="python -m launchers.nemo", description=__doc__.splitlines()[0])
    parser.add_argument("items", nargs="+", metavar="STAGE|key.path=value")
    parser.add_argument("--recipe", required=True, help="recipe YAML (recipes/*.yaml)")
    parser.add_argument("--executor", choices=("slurm", "local"), default="slurm")
    parser.add_argument("--nproc", type=int, default=1, help="ranks for the local executor")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, submit nothing")
    try:
        from launchers.slurm.submit import check_stages, check_world
        from pipeline.config import load_recipe

        args = parser.parse_intermixed_args(argv)
        stages = [i for i in args.items if "=" not in i]
        overrides = [i for i in args.items if "=" in i]
        if not stages:
            raise UserError("python -m launchers.nemo: name at least one stage")
        check_stages(stages)
        recipe = load_recipe(args.recipe, overrides)
        if args.executor == "slurm":
            check_world(recipe, stages)
        # nemo-run's console chatter goes to stderr, so that a dry run's stdout is the scripts alone
        with contextlib.redirect_stdout(sys.stderr if args.dry_run else sys.stdout):
            scripts = run_stages(recipe, args.recipe, stages, overrides, args.executor, args.nproc, args.dry_run)
        for stage, text in zip(stages, scripts):
            print(f"# ---- nemo-run task {stage}", file=sys.stderr, flush=True)
            print(text, flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
