"""One elastic checkpoint in memory: the full HF model loaded once, every budget a view model on its tensors.

    family = Family.load("runs/tiny/elastic", device="cpu")
    small, full = family.model("small"), family.model("full")   # share every byte of their weights

The directory is what ``python -m pipeline export`` writes (config.json + safetensors of the permuted full
model, elastic.json with the budgets, the tokenizer).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from pipeline.elastic.elastic_dir import ELASTIC_JSON, find_budget, read_elastic
from pipeline.errors import UserError

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# views: budgets share the full model's storage (gathers for grouped heads); sliced: each budget a contiguous copy
ENGINES = ("views", "sliced")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: CUDA is not available on this machine")
    return torch.device(device)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class Family:
    def __init__(self, ckpt_dir: str, full, model_cfg, budgets, base_cfg: dict, tokenizer, engine: str = "views"):
        if engine not in ENGINES:
            raise UserError(f"engine {engine!r}: one of {', '.join(ENGINES)}")
        self.dir, self.full, self.model_cfg, self.budgets = ckpt_dir, full, model_cfg, budgets
        self.base_cfg, self.tokenizer, self.engine = base_cfg, tokenizer, engine
        self._views: Dict[str, torch.nn.Module] = {}

    @classmethod
    def load(cls, ckpt_dir: str, device: str = "auto", dtype: str = "auto", engine: str = "views") -> "Family":
        """dtype auto: bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and the demo trains in fp32)."""
        from transformers import AutoTokenizer, NemotronHForCausalLM

        from pipeline.hf.config import read_hf_config

        quiet_transformers()
        _, model_cfg, budgets = read_elastic(ckpt_dir)
        base_cfg = read_hf_config(ckpt_dir)
        dev = resolve_device(device)
        want = DTYPES[dtype] or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        try:
            tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
        except (OSError, ValueError) as e:
            raise UserError(f"{ckpt_dir}: no usable tokenizer ({str(e).splitlines()[0]})") from None
        full = NemotronHForCausalLM.from_pretrained(ckpt_dir, dtype=want).to(dev).eval()
        full.requires_grad_(False)
        order = sorted(budgets, key=lambda b: -b.subnet.count(model_cfg).active)
        return cls(ckpt_dir, full, model_cfg, order, base_cfg, tokenizer, engine)

    @property
    def names(self) -> List[str]:
        """Budget names, largest (active parameters) first."""
        return [b.name for b in self.budgets]

    def active_params(self, name: str) -> int:
        return int(self.budget(name).subnet.count(self.model_cfg).active)

    def budget(self, name: str):
        return find_budget(self.budgets, name, os.path.join(self.dir, ELASTIC_JSON))

    def model(self, name: str):
        """The budget's model (built once): a view of the full model's tensors, or with engine ``sliced`` a
        contiguous copy (the full budget is then the full model itself)."""
        from pipeline.elastic.subnet import Subnet
        from pipeline.inference.views import view_model

        if name not in self._views:
            b = self.budget(name)
            if not b.subnet.homogeneous:
                raise UserError(f"{os.path.join(self.dir, ELASTIC_JSON)}: budget {name!r} has per-layer sizes; "
                                "a NemotronH model holds one size per axis")
            if self.engine == "sliced" and b.subnet == Subnet.full(self.model_cfg):
                self._views[name] = self.full
            else:
                self._views[name] = view_model(self.full, self.base_cfg, self.model_cfg, b.subnet,
                                               copy=self.engine == "sliced")
        return self._views[name]

    def all_models(self) -> List[torch.nn.Module]:
        return [self.model(n) for n in self.names if self.budget(n).subnet.homogeneous]

    @property
    def device(self) -> torch.device:
        return self.full.device

    def smallest(self) -> str:
        return self.names[-1]

    def largest(self) -> str:
        return self.names[0]


def checkpoint_dir(recipe, given: Optional[str]) -> str:
    """--checkpoint, else the recipe run's elastic checkpoint (<root>/<name>/elastic)."""
    if given:
        return given
    if recipe is None:
        raise UserError("--checkpoint DIR is required without --recipe")
    return os.path.join(recipe.run.root, recipe.run.name, "elastic")
