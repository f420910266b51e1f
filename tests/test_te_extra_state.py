"""Transformer Engine FP8 extra state read from a checkpoint without running a pickle (training/te_extra_state.py).

TE >= 2.20 refuses pickled delayed-scaling state unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1; a checkpoint of an
FP8 run then could not be resumed or evaluated (seen on the H200, RESULTS.md). The stand-in module below refuses
exactly as TE does; the real TE modules are exercised by tests/gpu/test_fp8_checkpoint.py.
"""

import os
import pickle

import pytest
import torch

from pipeline.errors import UserError
from pipeline.training import te_extra_state as tes


def te_payload(amax: torch.Tensor) -> torch.Tensor:
    """The payload shape TE's get_extra_state writes for delayed scaling (less the recipe object, which needs TE)."""
    state = {"scale_fwd": torch.full((3,), 2.0), "amax_history_fwd": amax, "scale_bwd": torch.ones(2),
             "amax_history_bwd": amax[:, :2].clone(),
             "extra_fp8_variables": {"num_gemms": 1, "fp8_checkpoint": True, "shapes": (16, 3), "tags": ["a"]}}
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)


class RefusingModule(torch.nn.Module):
    """Refuses a non-empty pickled extra state unless the opt-in is set, as TE's set_extra_state does."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.state = None

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        if state.numel() == 0:
            return
        if os.environ.get(tes.OPT_IN) != "1":
            raise RuntimeError("Refusing to load pickled Transformer Engine extra state")
        self.state = pickle.loads(state.numpy().tobytes())


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class EvilStorage:
    """A tensor storage whose bytes hide a pickle that would write a file (torch.storage._load_from_bytes)."""

    def __init__(self, path):
        self.inner = _torch_save_bytes(Evil(path))

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.inner,))


def _torch_save_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_vetted_payload_loads_into_a_refusing_module_with_every_value(monkeypatch):
    monkeypatch.delenv(tes.OPT_IN, raising=False)
    amax = torch.rand(16, 3)
    sd = {"weight": torch.ones(2), "_extra_state": te_payload(amax)}
    m = RefusingModule()
    with pytest.raises(RuntimeError, match="Refusing"):  # what TE did with our FP8 checkpoints
        m.load_state_dict(sd)
    vetted = tes.vetted(sd, "ckpt")
    assert vetted["weight"] is sd["weight"]
    with tes.allow_vetted_pickles():
        m.load_state_dict(vetted)
    assert tes.OPT_IN not in os.environ  # the opt-in lasts for the load only
    assert torch.equal(m.state["amax_history_fwd"], amax) and torch.equal(m.state["scale_fwd"], torch.full((3,), 2.0))
    assert m.state["extra_fp8_variables"] == {"num_gemms": 1, "fp8_checkpoint": True, "shapes": (16, 3), "tags": ["a"]}
    assert torch.equal(m.weight.detach(), torch.ones(2))


def test_empty_and_grouped_keys(monkeypatch):
    monkeypatch.delenv(tes.OPT_IN, raising=False)
    empty = torch.empty(0, dtype=torch.uint8)
    sd = {"a._extra_state": empty, "experts.linear_fc1._extra_state3": te_payload(torch.ones(4, 3)),
          "not_extra_state_x": torch.ones(1)}
    out = tes.vetted(sd, "ckpt")
    assert out["a._extra_state"] is empty and out["not_extra_state_x"] is sd["not_extra_state_x"]
    assert torch.equal(pickle.loads(out["experts.linear_fc1._extra_state3"].numpy().tobytes())["amax_history_fwd"],
                       torch.ones(4, 3))


@pytest.mark.parametrize("evil", [Evil, EvilStorage])
def test_a_payload_outside_the_allowlist_is_refused_and_never_runs(tmp_path, monkeypatch, evil):
    monkeypatch.delenv(tes.OPT_IN, raising=False)
    marker = tmp_path / "ran"
    payload = torch.frombuffer(bytearray(pickle.dumps({"scale_fwd": evil(str(marker))})), dtype=torch.uint8)
    with pytest.raises(UserError) as e:
        tes.vetted({"decoder.layers.0.mlp.linear_fc1._extra_state": payload}, "/ck/iter_0000002")
    msg = str(e.value)
    assert "/ck/iter_0000002" in msg and "decoder.layers.0.mlp.linear_fc1._extra_state" in msg and tes.OPT_IN in msg
    assert "\n" not in msg
    assert not marker.exists()


def test_a_torn_payload_is_one_line(monkeypatch):
    monkeypatch.delenv(tes.OPT_IN, raising=False)
    torn = te_payload(torch.ones(2, 3))[:40].clone()
    with pytest.raises(UserError, match="_extra_state is a pickle this pipeline will not run"):
        tes.vetted({"x._extra_state": torn}, "ckpt")


def test_the_users_opt_in_keeps_te_behaviour(monkeypatch):
    monkeypatch.setenv(tes.OPT_IN, "1")
    sd = {"_extra_state": te_payload(torch.ones(2, 3))}
    assert tes.vetted(sd, "ckpt") is sd
    with tes.allow_vetted_pickles():
        pass
    assert os.environ[tes.OPT_IN] == "1"
