"""Importance scores on one rank: planted signals rank first on every axis; REAP equals a hand computation.

Planted signals: in the tiny parent (pattern MEM*-M*E, random weights), chosen units are made important by
scaling what feeds them (norm weights, q rows, in_proj x rows, fc1 rows, fc2 of an expert) or by making a layer
carry the output; the scores must put exactly those first (within their group where the axis is grouped).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import importance_worker as w
from pipeline import parallel
from pipeline.elastic.importance import depth as depth_mod
from pipeline.elastic.importance.collect import Collector
from pipeline.elastic.importance.forward import forward_only
from pipeline.elastic.importance.layers import scoring_model
from pipeline.elastic.importance.orders import orders_from_scores
from pipeline.elastic.importance.run import calibration_batches, calibration_plan


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("importance_scores"))
    parallel.initialize(w.recipe(root))

    def build(extra=()):
        r = w.recipe(root, extra=list(extra))
        model = scoring_model(r, torch.float32)
        w.randomize(model, 3)
        return r, model

    yield build
    parallel.shutdown()


def layers(model):
    return {layer.layer_number - 1: layer for layer in w.stack(model)}


@torch.no_grad()
def ranked(r, model):
    scores = w.scores_of(model, r)
    return scores, orders_from_scores(scores, r.model)


def test_planted_hidden_channels_rank_first(env):
    """Aggregated over all norms: boosting 3 channels in 2 of the 9 norms puts them first."""
    r, model = env()
    planted = [3, 77, 100]
    with torch.no_grad():
        layers(model)[3].input_layernorm.weight[planted] *= 20
        w.unwrap_model(model).decoder.final_norm.weight[planted] *= 20
    _, orders = ranked(r, model)
    assert sorted(orders.hidden[:3].tolist()) == planted


def test_planted_attention_heads_rank_first_within_their_kv_group(env):
    """8 heads in 2 KV groups; the planted head of each group attends sharply (large q), the others
    uniformly (q = 0): a sharp head outputs single v vectors, a uniform one their average (smaller norm)."""
    r, model = env(w.NO_ELASTIC + ["model.num_attention_heads=8", "model.attention_head_dim=16"])
    planted = [2, 5]
    hd, per_group = 16, 4
    with torch.no_grad():
        qkv = layers(model)[3].self_attention.linear_qkv.weight  # rows per group: [q0..q3, k, v]
        for head in range(8):
            g, j = divmod(head, per_group)
            rows = slice(g * (per_group + 2) * hd + j * hd, g * (per_group + 2) * hd + (j + 1) * hd)
            qkv[rows] *= 50 if head in planted else 0
    _, orders = ranked(r, model)
    order = orders.layers[3]["attention_heads"].tolist()
    assert order[0] == 2 and order[per_group] == 5, order
    assert sorted(order[:per_group]) == [0, 1, 2, 3], "a head left its KV group"


def test_planted_mamba_heads_and_channels_rank_first_within_their_group(env):
    r, model = env()
    mixer = layers(model)[2].mixer
    d, p = mixer.d_inner_local_tp, mixer.headdim  # 8 heads x 16 channels, 2 groups of 4 heads
    with torch.no_grad():
        for head in (1, 6):
            mixer.in_proj.weight[d + head * p:d + (head + 1) * p] *= 10  # x rows of the head
        mixer.in_proj.weight[d + 0 * p + 5] *= 10  # channel 5 of head 0
    _, orders = ranked(r, model)
    heads = orders.layers[2]["mamba_heads"].tolist()
    assert heads[0] == 1 and heads[4] == 6, heads
    assert sorted(heads[:4]) == [0, 1, 2, 3], "a head left its Mamba group"
    assert orders.layers[2]["mamba_head_channels"][0, 0] == 5


def test_planted_ffn_channels_rank_first_dense_shared_and_per_expert(env):
    r, model = env()
    with torch.no_grad():
        layers(model)[4].mlp.linear_fc1.weight[[10, 200]] *= 10  # dense MLP
        moe = layers(model)[1].mlp
        moe.shared_experts.linear_fc1.weight[7] *= 10
        moe.experts.local_experts[3].linear_fc1.weight[9] *= 10  # routed expert 3 only
    scores, orders = ranked(r, model)
    assert sorted(orders.layers[4]["ffn"][:2].tolist()) == [10, 200]
    assert orders.layers[1]["shared_expert_ffn"][0] == 7
    assert scores.layers[1]["expert_tokens"][3] > 0
    assert orders.layers[1]["moe_ffn"][3, 0] == 9  # each expert sorted on its own
    assert (orders.layers[1]["moe_ffn"][:, 0] == 9).sum() == 1


def test_planted_experts_rank_by_reap(env):
    r, model = env()
    experts = layers(model)[7].mlp.experts.local_experts
    with torch.no_grad():
        experts[5].linear_fc2.weight *= 10
        experts[2].linear_fc2.weight.zero_()
    scores, orders = ranked(r, model)
    assert (scores.layers[7]["expert_tokens"][[2, 5]] > 0).all()
    order = orders.layers[7]["experts"].tolist()
    assert order[0] == 5 and order[-1] == 2, order
    assert scores.layers[7]["experts"][2] == 0


def test_planted_layers_rank_by_iterative_removal(env):
    """A layer with zero output is removed first (nMSE 0); a layer made to carry the output goes last. The
    embedding is scaled up so the other layers only nudge the residual stream (otherwise the first layer,
    feeding everything after it, is the most important one of a random model)."""
    r, model = env(["importance.depth=true", "importance.depth_samples=4"])
    with torch.no_grad():
        w.unwrap_model(model).embedding.word_embeddings.weight *= 20
        layers(model)[2].mixer.out_proj.weight.zero_()
        layers(model)[3].self_attention.linear_proj.weight *= 100
    plan = calibration_plan(r)
    subset = list(itertools.islice(calibration_batches(r, plan, 0, 1), 2))  # 4 samples, micro-batches of 2

    def run_pass(on_final):
        forward_only(model, iter(subset), len(subset), 64, 2, on_final)

    result = depth_mod.removal_order(model, r.model.num_layers, r.model.num_layers - 1, run_pass)
    order = result["removal_order"]
    assert sorted(order) == list(range(8))
    assert order[0] == 2 and order[-1] == 3, order
    assert result["rounds"][0]["nmse"]["2"] == 0.0
    assert result["passes"] == 1 + sum(range(2, 9))  # the reference + one per candidate per round


def _moe_model(env):
    """One MoE layer, 4 experts of width 8, top-2, sigmoid + expert bias, normalised x 2.5, no shared expert."""
    return env(w.NO_ELASTIC + ["model.pattern=E", "model.num_layers=1", "model.hidden_size=16",
                               "model.num_experts=4", "model.moe_ffn_hidden_size=8", "model.moe_topk=2",
                               "model.moe_shared_expert_ffn_hidden_size=0", "model.moe_topk_scaling_factor=2.5"])


def test_reap_equals_hand_computation_with_the_combine_weight(env):
    r, model = _moe_model(env)
    moe = layers(model)[0].mlp
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(4, 16, generator=g))
        moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.6]))  # selection only: pulls in expert 3
        for e in moe.experts.local_experts:
            e.linear_fc1.weight.copy_(torch.randn(8, 16, generator=g) * 0.5)
            e.linear_fc2.weight.copy_(torch.randn(16, 8, generator=g) * 0.5)
    x = torch.randn(12, 1, 16, generator=g)  # [tokens, batch, hidden]

    collector = Collector(model, r.model.pattern)
    with torch.no_grad():
        moe(x)
    scores = collector.finish().layers[0]

    # by hand: sigmoid scores, top-2 of score + bias, gate = selected scores normalised, x 2.5
    tokens = x.reshape(12, 16)
    s = torch.sigmoid(tokens @ moe.router.weight.T)
    chosen = torch.topk(s + moe.router.expert_bias, 2, dim=-1).indices
    unbiased = torch.topk(s, 2, dim=-1).indices
    assert not torch.equal(chosen.sort(-1).values, unbiased.sort(-1).values), "the bias must change the routing"
    gate = torch.gather(s, 1, chosen) / torch.gather(s, 1, chosen).sum(-1, keepdim=True) * 2.5
    softmax_gate = torch.gather(torch.softmax(tokens @ moe.router.weight.T, -1), 1, chosen)

    def expert_out(j, t):
        e = moe.experts.local_experts[j]
        return e.linear_fc2.weight @ F.relu(e.linear_fc1.weight @ t).pow(2)

    expected, with_softmax, counts, mean_gate = (torch.zeros(4) for _ in range(4))
    for t in range(12):
        for k in range(2):
            j = int(chosen[t, k])
            norm = expert_out(j, tokens[t]).norm()
            expected[j] += gate[t, k] * norm
            with_softmax[j] += softmax_gate[t, k] * norm
            counts[j] += 1
            mean_gate[j] += gate[t, k]
    expected, with_softmax, mean_gate = (v / counts.clamp(min=1) for v in (expected, with_softmax, mean_gate))

    assert torch.equal(scores["expert_tokens"], counts)
    assert torch.allclose(scores["experts"], expected, rtol=1e-5, atol=0)
    assert torch.allclose(scores["expert_gate"], mean_gate, rtol=1e-5, atol=0)
    assert (scores["experts"] - with_softmax).abs().max() > 0.1 * expected.max(), "softmax gate not told apart"
