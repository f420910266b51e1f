"""A random-init elastic checkpoint directory for a recipe, in seconds: for throughput measurements and tests.

Same layout as ``export`` writes (config.json + model.safetensors of a NemotronH model, elastic.json, a
tokenizer with the chat template): the budgets are the recipe's ``elastic.axes`` choices (budget j takes
choice j, ``storage.budgets_from_axes``), the weights transformers' own init, the tokenizer the demo BPE
trained on a small generated corpus. Untrained: its answers are noise; its speed is the real thing.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from pipeline.errors import UserError


def make_random_checkpoint(recipe, out_dir: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                           tokenizer_records: int = 300) -> str:
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from data_prep import demo_corpus, demo_tokenizer
    from pipeline.elastic.elastic_dir import write_elastic_json
    from pipeline.elastic.storage import budgets_from_axes
    from pipeline.hf.config import hf_config_from_model, hf_dtype_name
    from pipeline.inference.views import _decode_floats

    try:
        budgets = budgets_from_axes(recipe)
    except ValueError as e:
        raise UserError(f"elastic.axes: {e}") from None
    cfg = hf_config_from_model(recipe.model, {"time_step_min": 1e-8}, hf_dtype_name(dtype))
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = NemotronHForCausalLM(NemotronHConfig.from_dict(_decode_floats(cfg))).to(dtype)
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    with tempfile.TemporaryDirectory() as corpus:
        path = os.path.join(corpus, "demo.jsonl")
        demo_corpus.write_jsonl(path, "chat", tokenizer_records, seed)
        vocab = min(512, recipe.model.vocab_size)
        demo_tokenizer.train_demo_tokenizer(os.path.join(corpus, "tok"), [path], vocab, {"random": seed})
        for name in os.listdir(os.path.join(corpus, "tok")):
            if name != demo_tokenizer.META_FILE:
                shutil.copy2(os.path.join(corpus, "tok", name), os.path.join(tmp, name))
    write_elastic_json(tmp, recipe.model, budgets, {"source_checkpoint": "random init", "budgets_file": ""})
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
