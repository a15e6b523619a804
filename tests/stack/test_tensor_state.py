"""install_tensor_state: non-tensor extra state as fixed-size uint8 chunks (fvcore-proof)."""
import pytest
import torch
from torch import nn

from mtl_plugins.compat.tensor_state import CHUNK, install_tensor_state


class Stateful(nn.Module):
    def __init__(self, payload):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.payload = payload

    def get_extra_state(self):
        return {"payload": self.payload, "rng": torch.Generator().manual_seed(3).get_state()}

    def set_extra_state(self, state):
        self.payload = state["payload"]


def _model(payload):
    return install_tensor_state(nn.Sequential(Stateful(payload)))


def test_round_trip_with_a_different_chunk_count():
    big = _model(list(range(3000)))  # several chunks
    sd = big.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    chunks = [k for k in sd if k.startswith("0._extra_state.") and k[-1].isdigit()]
    assert len(chunks) > 1 and all(sd[k].shape == (CHUNK,) for k in chunks)
    small = _model([1])
    assert len(small.state_dict()) < len(sd)  # fewer chunks: shapes still all equal
    result = small.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert small[0].payload == list(range(3000))


def test_detection_checkpointer_round_trip(tmp_path):
    checkpoint = pytest.importorskip("detectron2.checkpoint")
    model = _model({"position": 5})
    checkpoint.DetectionCheckpointer(model, str(tmp_path)).save("m")
    fresh = _model(None)
    checkpoint.DetectionCheckpointer(fresh).load(str(tmp_path / "m.pth"))
    assert fresh[0].payload == {"position": 5}


def test_truncated_checkpoint_names_the_entry():
    sd = _model(list(range(3000))).state_dict()
    del sd["0._extra_state.1"]
    with pytest.raises(RuntimeError, match=r"0\._extra_state.*missing"):
        _model(None).load_state_dict(sd)
