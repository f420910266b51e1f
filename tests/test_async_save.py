"""checkpointing.async_save: megatron's asynchronous dist-checkpoint save writes a checkpoint that resumes exactly
(the resumed loss curve equals a straight run's, step for step), marked latest only once complete."""

import os

from conftest import TINY
from pipeline.config.load import load_recipe
from pipeline.training.loop import Trainer
from pipeline.training.metrics import read_metrics
from pipeline.training.task import LMTask

# constant LR: a run of 2 steps then its resumption to 4 follow the same schedule as a straight run of 4
ARGS = ["training.seq_length=32", "training.micro_batch_size=2", "training.global_batch_size=4",
        "training.lr_warmup_iters=0", "training.lr_decay_style=constant", "logging.log_interval=1",
        "logging.tensorboard=false", "checkpointing.save_interval=2", "checkpointing.keep_last=0"]


def pretrain(root, iters, *extra):
    r = load_recipe(TINY, [f"run.root={root}", f"training.train_iters={iters}", *ARGS, *extra])
    Trainer(r, "pretrain", LMTask(r, "pretrain")).run()


def test_async_saved_checkpoint_resumes_exactly(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(straight, 4)
    pretrain(resumed, 2, "checkpointing.async_save=true")
    out = capsys.readouterr().out
    assert "started async save of checkpoint" in out and "step stall" in out
    ckpts = resumed / "tiny" / "pretrain" / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "2"  # finalised before exit
    assert os.path.isfile(ckpts / "iter_0000002" / "metadata.json")
    pretrain(resumed, 4, "checkpointing.async_save=true")
    assert "(iteration 2)" in capsys.readouterr().out  # resumed from the async-saved checkpoint
    want, got = read_metrics(str(straight / "tiny" / "pretrain")), read_metrics(str(resumed / "tiny" / "pretrain"))
    for step in (3, 4):
        assert got[step]["loss"] == want[step]["loss"] and got[step]["grad_norm"] == want[step]["grad_norm"], step
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


WRITER = r"""
import os, sys, tempfile
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from pipeline.compat import cpu
cpu.apply()
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from pipeline.training import checkpoint
dist.init_process_group("gloo", init_method="file://" + os.path.join(sys.argv[2], "pg"), rank=0, world_size=1)
checkpoint._thread_results_queue(async_save=True)
sd = {f"t{i}": ShardedTensor.from_rank_offsets(f"t{i}", torch.full((4,), float(i))) for i in range(3000)}
d, calls = tempfile.mkdtemp(dir=sys.argv[2]), AsyncCallsQueue()
calls.schedule_async_request(dist_checkpointing.save(sd, d, async_sharded_save=True, async_strategy="mcore"))
calls.maybe_finalize_async_calls(blocking=True)
calls.close()
back = dist_checkpointing.load({k: ShardedTensor.from_rank_offsets(k, torch.empty(4)) for k in sd}, d)
assert all(torch.equal(back[k], v.data) for k, v in sd.items())
print("written", len(back))
"""


def test_async_save_of_thousands_of_tensors_finishes(tmp_path):
    """The async writer returns one write result per tensor through the results queue; with a plain
    multiprocessing queue, past ~2,000 tensors (the 1.1B proxy with its optimizer state) the writer blocked on
    the full pipe and the trainer waited for it forever (seen on the H200). 3,000 tensors must finish."""
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", WRITER, ROOT, str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "written 3000" in proc.stdout, proc.stderr[-2000:]
