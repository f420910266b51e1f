"""The megatron-core budget engine on CPU: a budget sliced from an elastic checkpoint into megatron, generating
from megatron's static inference states, picks the same greedy tokens as transformers' NemotronH of the same slice,
and each decode step's logits equal megatron's own forward over the whole sequence (no cache)."""

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
    prompt = torch.randint(0, family.model_cfg.vocab_size, (1, 37), generator=torch.Generator().manual_seed(3))
    n = 6
    tokens, step_logits = greedy_generate(model, prompt, n)

    hf = family.model(name)
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0, use_cache=True)
    with torch.no_grad():
        hf_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        hf_logits = hf(tokens).logits[0, prompt.shape[1] - 1:-1]
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        uncached = model(tokens, positions, None)[0, prompt.shape[1] - 1:-1]
    assert torch.equal(tokens, hf_tokens), (tokens, hf_tokens)
    cached = torch.cat(step_logits)
    print(f"\n{name}: max |cached - uncached| {(cached - uncached).abs().max():.3g}, max |megatron - transformers| "
          f"{(cached - hf_logits).abs().max():.3g}, max |logits| {cached.abs().max():.3g}")
    assert cached.abs().max() > 0.1  # real logits
    assert (cached - uncached).abs().max() <= 1e-5  # megatron's cached states vs its own full forward
    assert (cached - hf_logits).abs().max() <= 1e-4  # vs transformers (another implementation)


def test_megatron_engine_refuses_a_batch(elastic):
    from pipeline.errors import UserError
    from pipeline.inference.megatron_engine import greedy_generate

    with pytest.raises(UserError, match="one sequence at a time"):
        greedy_generate(torch.nn.Linear(2, 2), torch.zeros(2, 5, dtype=torch.long), 3)
