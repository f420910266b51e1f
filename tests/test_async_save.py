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
