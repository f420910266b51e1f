"""The recipes' elastic sections (every key present and commented) and their validation errors."""

import dataclasses

import pytest

from conftest import NANO, TINY
from pipeline.config import load_recipe
from pipeline.config.schema import ElasticAxes, ElasticConfig
from pipeline.errors import UserError


def elastic_section(path):
    """(line number, line) of the recipe's ``elastic:`` section."""
    lines = open(path).read().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("elastic:")))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace())
    return list(enumerate(lines[start:end], start + 1))


@pytest.mark.parametrize("path", [TINY, NANO])
def test_elastic_section_states_and_comments_every_key(path):
    section = elastic_section(path)
    keys = {line.split(":")[0].strip() for _, line in section if ":" in line and not line.strip().startswith("-")}
    fields = {f.name for f in dataclasses.fields(ElasticConfig)} | {f.name for f in dataclasses.fields(ElasticAxes)}
    assert fields <= keys, f"{path}: elastic keys not stated: {sorted(fields - keys)}"
    for n, line in section:
        if line.strip() and not line.strip().startswith("- {"):
            assert "#" in line, f"{path}:{n} has no comment: {line}"


BAD = {
    "target": ("elastic.target=latency", "elastic.target = 'latency', expected one of active, params, memory"),
    "tau decay": ("elastic.tau_decay=1.5", "elastic.tau_decay = 1.5 must be <= 1"),
    "router width": ("elastic.router_hidden=0", "elastic.router_hidden = 0 must be >= 1"),
    "temperature": ("elastic.kd_temperature=0", "elastic.kd_temperature = 0.0 must be > 0"),
    "aux loss": ("model.moe_aux_loss_coeff=0.01", "elastic.axes.experts needs model.moe_aux_loss_coeff = 0"),
    "unreachable": ("elastic.budgets=[{name: a, fraction: 1.0}, {name: b, fraction: 0.2}]",
                    "elastic.budgets[1].fraction = 0.2 is out of reach: the smallest choice of every axis gives "
                    "0.330 of the parent's active size"),
    "memory unreachable": ("elastic.target=memory", "elastic.budgets[2].fraction = 0.5 is out of reach"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_elastic_keys_are_one_line_errors(case):
    override, expected = BAD[case]
    with pytest.raises(UserError) as e:
        load_recipe(TINY, [override])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_shipped_budgets_are_reachable():
    for path in (TINY, NANO):
        recipe = load_recipe(path)
        assert recipe.elastic.budgets and recipe.elastic.target == "active"


def test_the_teacher_runs_in_the_students_fp8_unless_teacher_fp8_is_off():
    """``<stage>.teacher_fp8``: an FP8 stage's frozen teacher in FP8 too (the default: faster), or in bf16, so an
    FP8 student learns from exactly a bf16 run's targets (bench/bench_fp8.py compares students that way)."""
    from pipeline.elastic.teacher import teacher_fp8

    r = load_recipe(TINY, ["stage1.training.fp8=delayed", "stage2.training.fp8=current"])
    assert (teacher_fp8(r.stage1), teacher_fp8(r.stage2), teacher_fp8(r.distill)) == ("delayed", "current", "none")
    r = load_recipe(TINY, ["stage1.training.fp8=delayed", "stage1.teacher_fp8=false",
                           "distill.training.fp8=delayed", "distill.teacher_fp8=false"])
    assert (teacher_fp8(r.stage1), teacher_fp8(r.distill)) == ("none", "none")
    with pytest.raises(UserError, match="stage1.teacher_fp8 must be bool"):
        load_recipe(TINY, ["stage1.teacher_fp8=maybe"])
