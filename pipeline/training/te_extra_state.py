"""Transformer Engine's FP8 scaling state (``_extra_state``) loaded from a checkpoint without running a pickle.

TE serialises a module's delayed-scaling state (scales, amax histories, the recipe) as a Python pickle, and
since 2.20 refuses to unpickle it unless ``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1`` — so a checkpoint of an FP8
run could not be resumed, evaluated or exported. Here every such payload is first read with a restricted
unpickler (megatron-core's allowlist for FP8 extra state: containers, numbers, tensors, TE's recipe classes;
tensor storage through ``torch.load(weights_only=True)``), then pickled again in this process from the objects it
produced, and only those payloads reach TE, with the opt-in set for the load alone. A payload naming anything
else is refused in one line; a user who has set the variable keeps TE's own behaviour.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
from typing import Dict, Iterator

import torch
from megatron.core.safe_globals import SafeUnpickler, safe_load_from_bytes

from pipeline.errors import UserError

OPT_IN = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"
_KEY = re.compile(r"(^|\.)_extra_state\d*$")  # TE modules; megatron's grouped linears add _extra_state1..N-1


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in (("torch.storage", "_load_from_bytes"), ("megatron.core.safe_globals",
                                                                        "safe_load_from_bytes")):
            return safe_load_from_bytes  # a storage's bytes: torch.load(weights_only=True), never a plain pickle
        if (module, name) not in SafeUnpickler._SAFE_CLASSES:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in FP8 extra state")
        return super().find_class(module, name)


def decode(payload: torch.Tensor) -> object:
    """The object of one pickled ``_extra_state`` payload, read through the allowlist (raises UnpicklingError)."""
    return _AllowlistUnpickler(io.BytesIO(payload.detach().cpu().numpy().tobytes())).load()


def encode(state: object) -> torch.Tensor:
    """TE's payload format (a uint8 tensor of pickle bytes) for an object built in this process."""
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)


def vetted(state_dict: Dict[str, object], where: str) -> Dict[str, object]:
    """``state_dict`` with every non-empty TE ``_extra_state`` payload re-encoded from its allowlisted reading;
    one payload outside the allowlist is a UserError naming its key."""
    if os.environ.get(OPT_IN) == "1":
        return state_dict  # the user trusts this checkpoint: TE's own (unrestricted) loading
    out = dict(state_dict)
    for key, value in state_dict.items():
        if not _KEY.search(key) or not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        try:
            out[key] = encode(decode(value))
        except Exception as e:  # noqa: BLE001 - a crafted or torn pickle fails in many ways; each is one line
            raise UserError(f"{where}: Transformer Engine state {key} is a pickle this pipeline will not run "
                            f"({str(e).splitlines()[0][:160]}); set {OPT_IN}=1 only for a checkpoint you "
                            "trust") from None
    return out


@contextlib.contextmanager
def allow_vetted_pickles() -> Iterator[None]:
    """TE's opt-in for the duration of one load_state_dict of vetted payloads, restored afterwards."""
    before = os.environ.get(OPT_IN)
    os.environ[OPT_IN] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(OPT_IN, None)
        else:
            os.environ[OPT_IN] = before
