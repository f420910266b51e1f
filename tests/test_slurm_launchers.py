"""Launchers without a scheduler: the sbatch dry run for the 4-node x 8-GPU Nano recipe against a golden file,
stage chaining, per-stage resources, user errors, the nemo-run dry run of the same job, the Makefile's stage
targets, and real 2-rank runs through launchers/local.sh and nemo-run's LocalExecutor."""

import io
import json
import os
import shlex
import subprocess
import sys

import pytest

from launchers.slurm.__main__ import run as slurm_cli
from launchers.slurm.render import render_stage
from launchers.slurm.submit import submit_chain
from pipeline.config import load_recipe
from pipeline.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANO = "recipes/nemotron_nano_v3_30b.yaml"
GOLDEN = os.path.join(REPO, "tests", "golden", "slurm_nano_4x8_pretrain.sbatch")
CLUSTER = ["slurm.account=llm_research", "slurm.partition=batch", "slurm.workdir=/lustre/you/star-elastic",
           "slurm.container_image=/lustre/you/images/star-elastic.sqsh",
           "slurm.container_mounts=[/lustre:/lustre]", "slurm.setup=[echo setup line]",
           "slurm.extra_sbatch=[--constraint=h100]"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def bash_syntax_ok(script: str) -> None:
    done = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_dry_run_renders_the_golden_4x8_script(capsys):
    slurm_cli(["pretrain", "--recipe", NANO, "--dry-run", *CLUSTER, "training.train_iters=500"])
    out = capsys.readouterr().out
    if os.environ.get("UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            f.write(out)
    with open(GOLDEN) as f:
        assert out == f.read()
    bash_syntax_ok(out)
    lines = out.splitlines()
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=TERM@120", "--requeue",
                 "--account=llm_research", "--partition=batch", "--time=04:00:00", "--constraint=h100"):
        assert f"#SBATCH {flag}" in lines, flag
    assert "export NCCL_NVLS_ENABLE=0" in lines and 'export MASTER_ADDR="$MASTER_NODE"' in lines
    # the stage gets the recipe overrides but not the slurm.* ones (those shaped the job)
    command = next(line for line in lines if "-m pipeline pretrain" in line)
    assert "training.train_iters=500" in command and "slurm." not in command


def test_chain_waits_afterok_and_stage_resources(capsys):
    slurm_cli(["pretrain", "params", "--recipe", NANO, "--dry-run", "--after", "77", *CLUSTER])
    captured = capsys.readouterr()
    headers = [line for line in captured.err.splitlines() if line.startswith("# ---- stage")]
    assert headers == [
        "# ---- stage pretrain: sbatch --parsable --dependency=afterok:77 nano_v3_elastic-pretrain.sbatch",
        "# ---- stage params: sbatch --parsable --dependency=afterok:<job id of pretrain> "
        "nano_v3_elastic-params.sbatch"]
    assert captured.out.count("#!/bin/bash") == 2
    # slurm.stages gives the data stage one node and its own time limit; other stages keep the defaults
    recipe = load_recipe(NANO, CLUSTER)
    data = render_stage(recipe, NANO, "data").script
    assert "#SBATCH --nodes=1" in data and "#SBATCH --time=08:00:00" in data
    assert "#SBATCH --nodes=4" in render_stage(recipe, NANO, "pretrain").script


def test_cpu_job_fixed_master_addr_and_port():
    recipe = load_recipe("recipes/tiny.yaml", ["slurm.master_addr=127.0.0.1", "slurm.master_port=29511"])
    script = render_stage(recipe, "recipes/tiny.yaml", "pretrain").script
    assert "--gpus-per-node" not in script and "--exclusive" not in script and "--container" not in script
    assert "export MASTER_ADDR=127.0.0.1" in script and "export MASTER_PORT=29511" in script
    assert "export OMP_NUM_THREADS=1" in script
    bash_syntax_ok(script)


@pytest.mark.parametrize("args, message", [
    (["stage9"], "invalid choice: 'stage9'"),
    (["pretrain", "slurm.nodes=1", "slurm.tasks_per_node=1", "slurm.gpus_per_node=1"],
     "gets 1 node(s) x 1 tasks = 1 ranks, not divisible by parallelism tp*pp*cp = 2"),
    (["pretrain", "slurm.time=4h"], "slurm.time = '4h' is not a SLURM time"),
    (["pretrain", "slurm.gpus_per_node=4"], "slurm.gpus_per_node = 4 must be 0 (CPU job) or"),
    (["pretrain", "slurm.stages.stage7.nodes=1"], "slurm.stages.stage7: unknown stage"),
    (["pretrain", "slurm.nodse=2"], "unknown key 'slurm.nodse' (did you mean 'slurm.nodes'?)"),
])
def test_user_errors_are_one_line_exit_2(args, message):
    done = subprocess.run([sys.executable, "-m", "launchers.slurm", *args, "--recipe", NANO, "--dry-run"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr


def test_submit_without_sbatch_is_a_user_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    jobs = [render_stage(load_recipe(NANO), NANO, "pretrain")]
    with pytest.raises(UserError, match="sbatch not found"):
        submit_chain(jobs)


@pytest.fixture
def nemo(monkeypatch):
    pytest.importorskip("nemo_run")
    # nemo-run's local tunnel (invoke) reads stdin: an empty stream without a file descriptor, which invoke reads
    # without select() (a real /dev/null opened late in a long pytest process can get an fd >= 1024, too high for it)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    from launchers.nemo import run_stages

    return run_stages


def test_nemo_run_dry_run_of_the_same_job(nemo, tmp_path):
    overrides = CLUSTER + [f"slurm.workdir={tmp_path}", "training.train_iters=500"]
    pretrain, params = nemo(load_recipe(NANO, overrides), NANO, ["pretrain", "params"], overrides,
                            executor="slurm", dry_run=True)
    sbatch = pretrain[pretrain.index("#!/bin/bash"):pretrain.index("# every rank runs")]
    bash_syntax_ok(sbatch)
    lines = sbatch.splitlines()
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=TERM@120", "--requeue",
                 "--account=llm_research", "--partition=batch", "--time=04:00:00", "--exclusive",
                 "--job-name=nano_v3_elastic-pretrain", "--kill-on-invalid-dep=yes", "--constraint=h100"):
        assert f"#SBATCH {flag}" in lines, flag
    assert "export TORCHX_MAX_RETRIES=3" in lines and "export NCCL_NVLS_ENABLE=0" in lines
    assert 'export MASTER_ADDR="$MASTER_NODE"' in lines and "echo setup line" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--container-image /lustre/you/images/star-elastic.sqsh" in srun and "torchrun" not in srun
    assert f"#   cd {tmp_path} || exit 1" in pretrain
    # the wrapper outlives SIGTERM and turns the stage's checkpoint marker into an exit code nemo-run requeues
    assert "#   trap '' TERM" in pretrain and "then rc=75; fi" in pretrain
    assert ("#   python -m pipeline pretrain --recipe recipes/nemotron_nano_v3_30b.yaml training.train_iters=500 "
            '2>&1 | tee "$log"') in pretrain
    assert "#SBATCH --nodes=4" in params and "-m pipeline params" in params


def test_nemo_run_local_executor_uses_torchrun(nemo, tmp_path):
    overrides = [f"slurm.workdir={tmp_path}"]
    (text,) = nemo(load_recipe("recipes/tiny.yaml", overrides), "recipes/tiny.yaml", ["pretrain"], overrides,
                   executor="local", nproc=2, dry_run=True)
    assert "'torchrun'" in text and "'--nproc-per-node',\n" in text and "'2'," in text
    assert f"#   cd {tmp_path} || exit 1" in text
    assert f"#   exec {sys.executable} -m pipeline pretrain --recipe recipes/tiny.yaml" in text


def test_make_stage_targets_call_the_launchers():
    def make(*args):
        return subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True)

    # the Makefile path gives exactly the golden script (make -> python -m launchers.slurm -> job.sbatch)
    done = make("pretrain", "LAUNCHER=slurm", f"RECIPE={NANO}",
                "ARGS=--dry-run " + " ".join(map(shlex.quote, CLUSTER + ["training.train_iters=500"])))
    assert done.returncode == 0, done.stderr
    with open(GOLDEN) as f:
        assert done.stdout == f.read()
    dry = make("-n", "all", "LAUNCHER=slurm", "ARGS=x.y=1").stdout.split()
    assert dry[1:13] == ["-m", "launchers.slurm", "data", "import", "importance", "stage1", "stage2", "evaluate",
                         "qad", "export", "--recipe", "recipes/tiny.yaml"]
    assert "--nproc-per-node=2" in make("-n", "stage2", "NPROC=2").stdout
    bad = make("pretrain", "LAUNCHER=pbs")
    assert bad.returncode != 0 and "LAUNCHER=pbs: use local, slurm or nemo" in bad.stderr
    # a stage the CLI does not have yet fails with the CLI's own one-line error
    from pipeline.cli import STAGES

    missing = [s for s in ("stage1", "stage2", "qad", "importance") if s not in STAGES]
    if missing:
        done = make(missing[0])
        assert done.returncode != 0
        assert f"error: python -m pipeline: argument STAGE: invalid choice: '{missing[0]}'" in done.stderr


SHORT_RUN = ["training.train_iters=4", "training.lr_warmup_iters=1", "training.seq_length=32",
             "training.global_batch_size=4", "training.micro_batch_size=1", "checkpointing.save_interval=4",
             "logging.tensorboard=false"]


@pytest.mark.slow
def test_local_sh_and_nemo_local_executor_run_two_ranks(tmp_path):
    """launchers/local.sh and nemo-run's LocalExecutor (both torchrun, NPROC=2): dp 2, the same final loss."""
    env = dict(os.environ, NPROC="2", PY=sys.executable, OMP_NUM_THREADS="1")
    local = subprocess.run([os.path.join(REPO, "launchers", "local.sh"), "pretrain", "--recipe",
                            os.path.join(REPO, "recipes", "tiny.yaml"), f"run.root={tmp_path}/sh", *SHORT_RUN],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    nemo = subprocess.run(["make", "-s", "pretrain", "LAUNCHER=nemo", "NEMO_EXECUTOR=local", "NPROC=2",
                           f"PY={sys.executable}", f"ARGS=run.root={tmp_path}/nemo " + " ".join(SHORT_RUN)],
                          cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    finals = []
    for done, root in ((local, "sh"), (nemo, "nemo")):
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-3000:]
        assert "dp 2 |" in out and "step 4/4" in out
        with open(tmp_path / root / "tiny" / "pretrain" / "final.json") as f:
            finals.append(json.load(f))
    assert finals[0]["iteration"] == 4 and finals[0] == finals[1]
