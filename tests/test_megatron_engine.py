"""The megatron-core budget engine on CPU: a budget sliced from an elastic checkpoint into megatron, generating
from megatron's static inference states (two prompts at once), picks the same greedy tokens as transformers' NemotronH
of the same slice, and each decode step's logits equal megatron's own forward over the whole sequence (no cache)."""

import pytest
import torch

from conftest import TINY


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    from pipeline import parallel
    from pipeline.config import load_recipe
    from pipeline.inference.family import Family
    from pipeline.inference.random_checkpoint import make_random_checkpoint

    recipe = load_recipe(TINY)
    d = tmp_path_factory.mktemp("megatron_engine")
    ckpt = make_random_checkpoint(recipe, str(d / "elastic"), torch.float32, tokenizer_records=60)
    parallel.initialize(recipe)
    yield {"recipe": recipe, "dir": ckpt, "family": Family.load(ckpt, "cpu", "fp32", engine="sliced"), "d": d}
    parallel.shutdown()


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_megatron_greedy_decode_equals_transformers_and_the_uncached_forward(elastic, which):
    from transformers import GenerationConfig

    from pipeline.inference.megatron_engine import greedy_generate, load_budget_model

    family = elastic["family"]
    name = getattr(family, which)()
    model = load_budget_model(elastic["recipe"], elastic["dir"], family.model_cfg, family.budget(name),
                              str(elastic["d"] / f"mcore_{name}"), torch.float32)
    # two prompts decoded together (each row its own Mamba and KV state), spanning two SSD chunks
    prompt = torch.randint(0, family.model_cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(3))
    n = 6
    tokens, step_logits = greedy_generate(model, prompt, n)

    hf = family.model(name)
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0, use_cache=True)
    with torch.no_grad():
        hf_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        hf_logits = hf(tokens).logits[:, prompt.shape[1] - 1:-1]
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(2, -1)
        uncached = model(tokens, positions, None)[:, prompt.shape[1] - 1:-1]
        alone, _ = greedy_generate(model, prompt[1:], n)  # the second row decoded on its own
    assert torch.equal(tokens, hf_tokens), (tokens, hf_tokens)
    assert torch.equal(alone[0], tokens[1])
    cached = torch.stack(step_logits, dim=1)  # [b, n, vocab]
    print(f"\n{name}: max |cached - uncached| {(cached - uncached).abs().max():.3g}, max |megatron - transformers| "
          f"{(cached - hf_logits).abs().max():.3g}, max |logits| {cached.abs().max():.3g}")
    assert cached.abs().max() > 0.1  # real logits
    assert (cached - uncached).abs().max() <= 1e-5  # megatron's cached states vs its own full forward
    assert (cached - hf_logits).abs().max() <= 1e-4  # vs transformers (another implementation)


def test_megatron_static_decode_needs_the_batched_mixer(elastic, tmp_path):
    """Why ``BatchedDecodeMambaMixer`` exists: megatron's own mixer runs a static decode step of two rows as one
    sequence of two tokens (on the GPU's kernels as on their references here), so its rows come out wrong."""
    from pipeline.inference import megatron_engine

    family = elastic["family"]
    name = family.smallest()
    load = lambda batched: megatron_engine.load_budget_model(  # noqa: E731
        elastic["recipe"], elastic["dir"], family.model_cfg, family.budget(name), str(tmp_path / str(batched)),
        torch.float32, batched_decode=batched)
    prompt = torch.randint(0, family.model_cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    _, right = megatron_engine.greedy_generate(load(True), prompt, 2)
    _, wrong = megatron_engine.greedy_generate(load(False), prompt, 2)
    assert torch.equal(right[0], wrong[0])  # the prefill is batched correctly either way
    assert (right[1] - wrong[1]).abs().max() > 1e-2  # the first decode step is not
