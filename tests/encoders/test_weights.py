"""The weights folder (model.safetensors, config.json, SHA256SUMS): save, verify, load."""

from __future__ import annotations

import fractions

import pytest
import torch

from skysense.encoders.weights import (
    is_weights_dir,
    load_weights,
    read_state_dict,
    save_weights,
    sha256_file,
)

pytestmark = pytest.mark.unit


def _state():
    w = torch.randn(4, 6)
    return {"a.weight": w, "a.t": w.t(), "b.index": torch.arange(5), "c.half": w[0].half()}


def test_save_then_load_is_exact(tmp_path):
    state = _state()  # a.t shares a.weight's storage and is not contiguous
    dst = save_weights(tmp_path / "w", state, {"preset": "tiny", "note": [1, 2]})
    assert is_weights_dir(dst) and not is_weights_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no temporary folder left
    sums = (dst / "SHA256SUMS").read_text().splitlines()
    assert sums == [
        f"{sha256_file(dst / 'model.safetensors')}  model.safetensors",
        f"{sha256_file(dst / 'config.json')}  config.json",
    ]
    loaded, config = load_weights(dst)
    assert config == {"format": "skysense-weights/1", "preset": "tiny", "note": [1, 2]}
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_replacing_a_folder_and_refusing_other_paths(tmp_path):
    save_weights(tmp_path / "w", {"x": torch.zeros(2)}, {})
    save_weights(tmp_path / "w", {"y": torch.ones(3)}, {"v": 2})
    state, config = load_weights(tmp_path / "w")
    assert list(state) == ["y"] and config["v"] == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a weights folder"):
        save_weights(tmp_path / "other", {"x": torch.zeros(1)}, {})
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="'m' is on the meta device"):
        save_weights(tmp_path / "m", {"m": torch.empty(2, device="meta")}, {})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_weights(tmp_path / "j", {"x": torch.zeros(1)}, {"bad": object()})
    assert not (tmp_path / "m").exists() and not (tmp_path / "j").exists()


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json"])
def test_a_changed_file_fails_verification(tmp_path, victim):
    dst = save_weights(tmp_path / "w", {"x": torch.randn(8)}, {"preset": "tiny"})
    data = bytearray((dst / victim).read_bytes())
    data[-2] ^= 0x01
    (dst / victim).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{dst}: {victim} does not match SHA256SUMS"):
        load_weights(dst)


def test_missing_sums_or_folder(tmp_path):
    dst = save_weights(tmp_path / "w", {"x": torch.randn(3)}, {})
    (dst / "SHA256SUMS").unlink()
    with pytest.raises(ValueError, match="no SHA256SUMS"):
        load_weights(dst)
    assert torch.equal(
        load_weights(dst, verify=False)[0]["x"], read_state_dict(dst, verify=False)[0]["x"]
    )
    with pytest.raises(ValueError, match="not a weights folder"):
        load_weights(tmp_path / "nowhere")


def test_pth_files_are_read_with_weights_only(tmp_path):
    torch.save({"x": torch.ones(2)}, tmp_path / "ok.pth")
    assert torch.equal(read_state_dict(tmp_path / "ok.pth")[0]["x"], torch.ones(2))
    # a plain Python class, not on torch's weights_only allow-list
    torch.save({"x": fractions.Fraction(1, 3)}, tmp_path / "pickled.pth")
    with pytest.raises(
        ValueError, match=r"pickled\.pth: not loadable with torch\.load\(weights_only=True\)"
    ):
        read_state_dict(tmp_path / "pickled.pth")
