"""Budget control (pipeline/inference): nested models as views, think-small / answer-large, budget-eval.

The elastic checkpoint: a seeded random NemotronH parent with every block kind (Mamba groups > 1, GQA,
MoE, dense MLP; perturbed 1-D parameters and expert bias), an elastic.json with three nested budgets (one
skips a layer) and a heterogeneous one, and the demo BPE tokenizer with its chat template. Checked:
- each budget's view model gives the logits of the model ``slice`` writes for that budget, bit for bit
  (CPU, fp32), and holding every budget adds no parameter storage beyond the full model (distinct
  storages behind all parameters and buffers, measured by data_ptr), the full model's being exactly the
  tensor bytes of the checkpoint's safetensors;
- the control on planted models: the trace stops at ``</think>`` or the cap (then closed for the model),
  the answer model re-prefills exactly prompt + trace + close, stop tokens trimmed;
- ``generate`` through the real CLI (streams, summary line, the tokenizer's stop ids), user errors one line;
- the Pareto front against an independent sweep; budget-eval writes its JSON table and PNG.
"""

import json
import os
import random

import pytest
import torch

from conftest import TINY
from test_hf_roundtrip import make_hf_parent, recipe_for
from test_slicing import budget_subnet

BUDGETS = [("full", 1.0, budget_subnet(0)), ("medium", 0.6, budget_subnet(1)), ("small", 0.3, budget_subnet(2, [5]))]


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    from data_prep import demo_corpus, demo_tokenizer
    from pipeline.elastic.elastic_dir import write_elastic_json
    from pipeline.elastic.subnet import ResolvedBudget

    d = tmp_path_factory.mktemp("budget_control")
    ckpt = str(d / "elastic")
    make_hf_parent(ckpt)
    m = recipe_for(ckpt).model
    hetero = budget_subnet(1)
    hetero.per_layer = {1: {"experts": 4}}
    budgets = [ResolvedBudget(n, f, s) for n, f, s in BUDGETS] + [ResolvedBudget("hetero", 0.5, hetero)]
    write_elastic_json(ckpt, m, budgets, {"source_checkpoint": "test"})
    corpus = str(d / "corpus.jsonl")
    demo_corpus.write_jsonl(corpus, "chat", 200, 1)
    demo_tokenizer.train_demo_tokenizer(str(d / "tok"), [corpus], 512, {})
    for name in os.listdir(d / "tok"):
        os.replace(d / "tok" / name, os.path.join(ckpt, name))
    return {"dir": ckpt, "model": m, "d": d}


@pytest.fixture(scope="module")
def family(elastic):
    from pipeline.inference.family import Family

    return Family.load(elastic["dir"], "cpu", "fp32")


def test_views_equal_sliced_models_bit_for_bit_and_add_no_memory(elastic, family, tmp_path):
    from transformers import NemotronHForCausalLM

    from pipeline.elastic.elastic_dir import slice_to_hf
    from pipeline.hf.safetensors_io import SafetensorsDir
    from pipeline.inference.views import effective_tensors, gathered_bytes, parameter_bytes, same_storage

    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(7))
    full_bytes = parameter_bytes([family.full])
    files = SafetensorsDir(elastic["dir"])
    assert full_bytes == sum(files.read(n).nbytes for n in files.tensors)  # the one copy: exactly the checkpoint
    views = []
    for name, _, subnet in BUDGETS:
        view = family.model(name)
        views.append(view)
        out = slice_to_hf(elastic["dir"], str(tmp_path / name), elastic["model"], family.budget(name), progress=False)
        sliced = NemotronHForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        sliced.config._experts_implementation = view.config._experts_implementation
        assert sum(p.numel() for p in view.parameters()) > 0
        # the view holds the sliced model's tensors (same names, shapes, values), none of them its own storage
        v_state, s_state = effective_tensors(view), sliced.state_dict()
        assert sorted(v_state) == sorted(s_state)
        assert all(torch.equal(v_state[k], s_state[k]) for k in s_state)
        assert same_storage(view, family.full) is None
        with torch.no_grad():
            a, b = view(tokens).logits, sliced(tokens).logits
        print(f"\n{name}: {subnet.to_json()} views == sliced: {torch.equal(a, b)}; gathered per forward "
              f"{gathered_bytes(view)} B")
        assert a.abs().max() > 0.5 and torch.equal(a, b)
    held = parameter_bytes([family.full] + views)
    print(f"full model {full_bytes} B; full + {len(views)} budget views {held} B")
    assert held == full_bytes
    # the views are of the full model's live storage: a change to it shows in every budget
    with torch.no_grad():
        family.full.lm_head.weight[0, 0] += 1.0
        assert all(v.lm_head.weight[0, 0] == family.full.lm_head.weight[0, 0] for v in views)
        family.full.lm_head.weight[0, 0] -= 1.0


def test_heterogeneous_budget_is_one_line(family):
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="per-layer sizes"):
        family.model("hetero")


class Planted:
    """A stand-in for a transformers model: emits a scripted token stream, honouring generate()'s
    ``max_new_tokens`` and ``eos_token_id`` as transformers does; records the input and cache it was given."""

    device = torch.device("cpu")

    def __init__(self, script):
        self.script, self.seen, self.caches = list(script), [], []

    def generate(self, x, attention_mask=None, generation_config=None, streamer=None, past_key_values=None):
        from types import SimpleNamespace

        self.seen.append(x[0].tolist())
        self.caches.append(past_key_values)
        out = []
        while self.script and len(out) < generation_config.max_new_tokens:  # a later call continues the script
            out.append(self.script.pop(0))
            if out[-1] in generation_config.eos_token_id:
                break
        seq = torch.cat([x, torch.tensor([out], dtype=x.dtype)], dim=1)
        return SimpleNamespace(sequences=seq, past_key_values=("cache of", self, len(self.seen)))


def test_control_with_planted_models(family):
    from pipeline.inference.chat import encode, special_tokens
    from pipeline.inference.control import Sampling, think_then_answer

    tok = family.tokenizer
    sp = special_tokens(tok)
    close, eos = sp.think_close, sp.stop[0]
    prompt = [5, 6, 7]
    # 1) the small model closes its trace after 3 tokens; the large one answers and stops
    small, large = Planted([40, 41, 42, close, 99, 99]), Planted([50, 51, eos, 52])
    r = think_then_answer(small, large, tok, sp, prompt, 10, Sampling(max_new_tokens=8))
    assert r.closed_by_model and r.think_ids == [40, 41, 42] and r.answer_ids == [50, 51]
    assert small.seen == [prompt]
    assert large.seen == [prompt + [40, 41, 42, close] + encode(tok, "\n")]  # the whole context, re-prefilled
    # 2) the cap cuts the trace: closed for the model with "\n</think>\n"; the answer cap holds too
    small, large = Planted(range(60, 80)), Planted(range(90, 120))
    r = think_then_answer(small, large, tok, sp, prompt, 4, Sampling(max_new_tokens=5))
    assert not r.closed_by_model and r.think_ids == [60, 61, 62, 63] and r.answer_ids == [90, 91, 92, 93, 94]
    assert large.seen == [prompt + [60, 61, 62, 63] + encode(tok, "\n</think>\n")]
    # 3) the small model ends its turn inside the trace: the stop token is dropped, the trace closed
    small, large = Planted([70, eos, 71]), Planted([eos])
    r = think_then_answer(small, large, tok, sp, prompt, 10, Sampling())
    assert not r.closed_by_model and r.think_ids == [70] and r.answer_ids == []
    assert large.seen == [prompt + [70] + encode(tok, "\n</think>\n")]
    assert large.caches == [None] and not r.cache_reused  # another width: no cache handed over
    # 4) one model thinks and answers: the answer continues on the thinking phase's cache, same context
    both = Planted([40, close, 50, eos])
    r = think_then_answer(both, both, tok, sp, prompt, 10, Sampling())
    assert r.cache_reused and r.think_ids == [40] and r.answer_ids == [50]
    assert both.seen == [prompt, prompt + [40, close] + encode(tok, "\n")]
    assert both.caches == [None, ("cache of", both, 1)]


def test_special_tokens_and_prompt_come_from_the_tokenizer(family):
    from pipeline.inference.chat import THINK_CLOSE, render_prompt, special_tokens

    tok = family.tokenizer
    sp = special_tokens(tok)
    # config.json holds transformers' defaults (eos 2 = <|im_start|> here, pad 0 = <|endoftext|>): not used
    assert family.base_cfg["eos_token_id"] == 2 and tok.convert_ids_to_tokens(2) == "<|im_start|>"
    assert 2 not in sp.stop
    assert tok.convert_ids_to_tokens(sp.think_close) == THINK_CLOSE
    assert {tok.convert_ids_to_tokens(i) for i in sp.stop} == {"<|endoftext|>", "<|im_end|>"}
    assert sp.pad == tok.pad_token_id
    text = render_prompt(tok, "What is 2 + 2?")
    assert text.endswith("<|im_start|>assistant\n<think>\n") and "What is 2 + 2?" in text


def _cli(capsys, *args):
    """``python -m pipeline ARGS`` in this process (the interpreter start is what a subprocess would add):
    (exit code, stdout, stderr)."""
    from pipeline.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_cli_streams_think_and_answer(elastic, capsys):
    code, out, err = _cli(capsys, "generate", "--checkpoint", elastic["dir"], "--think", "small", "--answer", "full",
                          "--think-tokens", "6", "--max-new-tokens", "4", "--prompt", "Sort the list [3, 1, 2].",
                          "--do-sample", "--temperature", "0.7", "--top-k", "20", "--seed", "3")
    assert code == 0, err[-2000:]
    assert out.startswith("<think>\n") and "</think>" in out
    summary = err.strip().splitlines()[-1]
    assert "think: small, 6 tokens, cut at 6 tokens" in summary and "answer: full" in summary, summary
    for args, what in [(["--think", "tiny"], "no budget 'tiny'"), (["--think", "hetero"], "per-layer sizes"),
                       (["--think-tokens", "0"], "--think-tokens"), (["model.hidden_size=3"], "need --recipe")]:
        code, out, err = _cli(capsys, "generate", "--checkpoint", elastic["dir"], "--prompt", "x", *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and what in lines[0], err[-2000:]
    code, _, err = _cli(capsys, "generate", "--checkpoint", str(elastic["d"] / "nowhere"), "--prompt", "x")
    assert code == 2 and "no such directory" in err


def _front_by_sweep(points):
    """Independent reference: sort by latency (ties: higher accuracy first), keep each point that beats the
    best accuracy seen so far; exact duplicates of a kept point are kept too."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best, last = set(), -1.0, None
    for i in order:
        if points[i][1] > best:
            front.add(i)
            best, last = points[i][1], points[i]
        elif points[i] == last:
            front.add(i)
    return front


def test_pareto_front():
    from pipeline.inference.pareto import pareto_front

    assert pareto_front([(1.0, 0.5), (2.0, 0.6), (1.5, 0.4), (3.0, 0.6), (0.5, 0.1)]) == {0, 1, 4}
    rng = random.Random(0)
    for _ in range(200):
        pts = [(rng.choice([0.5, 1.0, 1.5, 2.0]), rng.choice([0.0, 0.25, 0.5, 1.0])) for _ in range(rng.randint(1, 9))]
        assert pareto_front(pts) == _front_by_sweep(pts), pts


def test_answers_are_checked_and_problems_held_out():
    from pipeline.config import load_recipe
    from pipeline.inference.problems import correct, generated, training_questions

    assert correct("The answer is [1, 2, 3].", "[1, 2, 3]") and correct("the answer is 42", "42")
    assert correct("so 7 - 2 = 5", "5") and not correct("The answer is 41.", "42") and not correct("", "1")
    recipe = load_recipe(TINY)
    seen = training_questions(recipe)
    assert len(seen) > 1000
    probs = generated(40, recipe.budget_eval.seed, seen)
    assert len(probs) == 40 and not any(p.prompt in seen for p in probs)


def test_budget_eval_writes_table_and_png(elastic, tmp_path, capsys):
    from pipeline.cli import run

    out = str(tmp_path / "be")
    run(["budget-eval", "--recipe", TINY, f"budget_eval.checkpoint={elastic['dir']}", f"budget_eval.out={out}",
         "budget_eval.num_problems=2", "budget_eval.think_tokens=5", "budget_eval.answer_tokens=3",
         "budget_eval.token_budget_caps=[2]", "budget_eval.budgets=[full, small]"])
    printed = capsys.readouterr().out
    with open(os.path.join(out, "budget_eval.json")) as f:
        table = json.load(f)
    labels = [r["label"] for r in table["rows"]]
    assert labels == ["small->full", "full->full", "small->small", "full->small", "full->full cap 2"]
    for r in table["rows"]:
        assert r["problems"] == 2 and 0 <= r["accuracy"] <= 1 and r["seconds_per_problem"] > 0
        assert r["think_tokens"] <= r["think_cap"] and r["answer_tokens"] <= 3 and r["tokens_per_s"] > 0
        assert r["label"] in printed
    assert any(r["pareto"] for r in table["rows"])
    assert table["budgets"]["full"] > table["budgets"]["small"]
    with open(os.path.join(out, "pareto.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_same_model_cache_continuation_equals_a_reprefill(family):
    """L->L continues on its cache; the same budget as a second view object re-prefills: same greedy tokens."""
    from pipeline.inference.chat import encode, render_prompt, special_tokens
    from pipeline.inference.control import Sampling, think_then_answer
    from pipeline.inference.views import view_model

    tok = family.tokenizer
    sp = special_tokens(tok)
    ids = encode(tok, render_prompt(tok, "Find the largest number in [3, 9, 4]."))
    model = family.model("medium")
    twin = view_model(family.full, family.base_cfg, family.model_cfg, family.budget("medium").subnet)
    a = think_then_answer(model, model, tok, sp, ids, 12, Sampling(max_new_tokens=10))
    b = think_then_answer(model, twin, tok, sp, ids, 12, Sampling(max_new_tokens=10))
    assert a.cache_reused and not b.cache_reused
    assert a.think_ids == b.think_ids and a.answer_ids == b.answer_ids and len(a.answer_ids) > 0


def test_budget_eval_user_errors_are_one_line(elastic, tmp_path):
    from data_prep.demo_corpus import source_seed
    from pipeline.cli import run
    from pipeline.errors import UserError

    base = ["budget-eval", "--recipe", TINY, f"budget_eval.checkpoint={elastic['dir']}",
            f"budget_eval.out={tmp_path / 'be'}"]
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "x", "answer": "1"}\n{"prompt": "no answer"}\n')
    cases = [
        ([f"budget_eval.seed={source_seed(0, 'reasoning_chat')}"], "is a data source's generator seed"),
        (["budget_eval.think_tokens=0"], "budget_eval.think_tokens = 0"),
        (["budget_eval.token_budget_caps=[4, -1]"], "budget_eval.token_budget_caps"),
        (["budget_eval.budgets=[full, huge]"], "budget_eval.budgets: ['huge']"),
        ([f"budget_eval.problems={tmp_path / 'none.jsonl'}"], "no such file"),
        ([f"budget_eval.problems={bad_jsonl}"], "bad.jsonl:2: expected a JSON object with prompt and answer"),
        ([f"budget_eval.checkpoint={tmp_path / 'nowhere'}"], "does not exist"),
    ]
    for overrides, what in cases:
        with pytest.raises(UserError, match=None) as e:
            run(base + overrides)
        assert what in str(e.value) and "\n" not in str(e.value), (overrides, str(e.value))
    assert not (tmp_path / "be").exists()  # nothing written


def test_sliced_engine_copies_and_agrees(family):
    """engine sliced: each budget a contiguous copy (the full budget is the full model): same logits as the
    views, and the copies' bytes are what it costs."""
    from pipeline.inference.family import Family
    from pipeline.inference.views import parameter_bytes

    copies = Family(family.dir, family.full, family.model_cfg, family.budgets, family.base_cfg, family.tokenizer,
                    "sliced")
    tokens = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    assert copies.model("full") is family.full
    extra = 0
    for name in ("medium", "small"):
        c, v = copies.model(name), family.model(name)
        assert all(p.is_contiguous() for p in c.parameters()) and parameter_bytes([c]) > 0
        extra += parameter_bytes([c])
        with torch.no_grad():
            assert torch.equal(c(tokens).logits, v(tokens).logits)
    assert parameter_bytes([family.full] + copies.all_models()) == parameter_bytes([family.full]) + extra
