"""``slt.checkpoints.load_state_dict``: weights in, never code."""

import pytest
import torch

from slt.checkpoints import load_state_dict


def _weights():
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)).state_dict()


def _assert_same(got, want):
    assert list(got) == list(want)
    for key in want:
        assert got[key].device.type == "cpu"
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_torch_save_raw_or_wrapped(tmp_path, wrap):
    sd = _weights()
    content = sd if wrap is None else {wrap: sd, "epoch": 3, "optimizer": {"lr": 0.1}}
    torch.save(content, tmp_path / "ckpt.pt")
    _assert_same(load_state_dict(tmp_path / "ckpt.pt"), sd)


def test_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sd = {k: v.contiguous() for k, v in _weights().items()}
    safetensors_torch.save_file(sd, str(tmp_path / "w.safetensors"))
    got = load_state_dict(str(tmp_path / "w.safetensors"))
    _assert_same({k: got[k] for k in sd}, sd)


class _Payload:
    """Unpickling this calls open(marker, "w"): code from the file runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refuses_a_file_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _weights(), "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"refusing to load checkpoint .*evil\.pt") as err:
        load_state_dict(path)
    assert "run code" in str(err.value) and "Unsupported global" in str(err.value)
    assert not marker.exists()
    # the payload is live: a plain unpickler would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_state_dict(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"refusing to load checkpoint .*junk\.pt"):
        load_state_dict(tmp_path / "junk.pt")
    torch.save(_weights(), tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"could not read checkpoint .*cut\.pt"):
        load_state_dict(tmp_path / "cut.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    pytest.importorskip("safetensors")
    with pytest.raises(ValueError, match=r"junk\.safetensors"):
        load_state_dict(tmp_path / "junk.safetensors")


def test_refuses_content_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"holds a list; expected a state dict"):
        load_state_dict(tmp_path / "list.pt")
    torch.save({"weights": _weights()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"keys 'weights'"):
        load_state_dict(tmp_path / "other.pt")
