"""Recipe checks of context parallelism, recompute and packed sequences, and per-stage parallelism blocks:
each mistake is one ``error:`` line naming the key (exit 2), before anything heavy."""

import pytest

from conftest import NANO, TINY
from pipeline.config import load_recipe
from pipeline.config.load import for_stage
from pipeline.errors import UserError

BAD = {
    "local attention": (TINY, ["model.backend=local", "parallelism.cp=2"],
                        "pretrain.parallelism.cp = 2 with attention layers needs model.backend: te"),
    "seq not a multiple of 2 cp": (TINY, ["model.pattern=MEME", "model.num_layers=4", "parallelism.cp=2",
                                          "training.seq_length=130"],
                                   "pretrain.training.seq_length = 130 must be a multiple of 2 x "
                                   "pretrain.parallelism.cp = 4"),
    "stage override": (NANO, ["stage2.parallelism.cp=5"],
                       "stage2.training.seq_length = 49152 must be a multiple of 2 x stage2.parallelism.cp = 10"),
    "mamba heads": (TINY, ["model.pattern=MEME", "model.num_layers=4", "parallelism.cp=16",
                           "training.seq_length=128"],
                    "pretrain.parallelism.cp = 16 must divide the Mamba heads per TP rank (8 / tp 1)"),
    "stage tp": (TINY, ["stage1.parallelism.tp=3"], "stage1.parallelism.tp = 3 does not divide model.num_attention_heads"),
    "recompute": (TINY, ["parallelism.recompute=partial"],
                  "parallelism.recompute = 'partial', expected one of none, full, selective"),
    "recompute module": (TINY, ["parallelism.recompute=selective", "parallelism.recompute_modules=[attention]"],
                         "pretrain.parallelism.recompute_modules has ['attention'], expected some of core_attn"),
    "document mask on TE": (TINY, ["model.backend=te", "training.document_attention_mask=true"],
                            "pretrain.training.document_attention_mask needs model.backend: local"),
    "document mask with cp": (TINY, ["model.pattern=MEME", "model.num_layers=4", "parallelism.cp=2",
                                     "stage2.training.document_attention_mask=true"],
                              "stage2.training.document_attention_mask with stage2.parallelism.cp = 2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_layout_is_one_line_naming_the_key(case):
    path, overrides, message = BAD[case]
    with pytest.raises(UserError) as e:
        load_recipe(path, overrides)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_error_is_one_line_exit_2(cli, tmp_path):
    proc = cli("pretrain", "--recipe", TINY, f"run.root={tmp_path}", "model.backend=local", "parallelism.cp=2")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "needs model.backend: te" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written


def test_auto_backend_without_te_refuses_cp_with_attention_at_build_time():
    """backend auto passes the recipe check (a GPU job resolves it to TE); where it resolves to local
    attention, building the model refuses CP with one line."""
    from pipeline import parallel
    from pipeline.model.build import build_model
    from pipeline.model.spec import te_available

    assert not te_available()  # the CPU test machine
    r = load_recipe(TINY, ["parallelism.cp=2"])
    parallel.initialize(load_recipe(TINY))  # one rank: the check fires before any CP group is needed
    with pytest.raises(UserError, match="needs Transformer Engine"):
        build_model(r)


def test_stage_parallelism_blocks_override_the_top_level():
    r = load_recipe(NANO)
    s1, s2 = for_stage(r, "stage1").parallelism, for_stage(r, "stage2").parallelism
    assert (r.parallelism.cp, r.parallelism.ep) == (1, 8)
    assert (s1.cp, s1.ep, s1.recompute, s1.recompute_modules) == (1, 16, "selective", ["moe"])
    assert (s2.cp, s2.ep, s2.recompute, s2.recompute_modules) == (4, 16, "selective", ["moe", "mamba"])
    assert s2.tp == r.parallelism.tp and s2.distributed_optimizer  # the rest comes from the top level
    assert for_stage(r, "importance") is r
    r = load_recipe(TINY, ["parallelism.tp=2", "stage2.parallelism.pp=2"])
    assert (for_stage(r, "stage2").parallelism.tp, for_stage(r, "stage2").parallelism.pp) == (2, 2)
    assert for_stage(r, "stage1").parallelism.pp == 1
