"""safetensors header validation and the pickle opt-in: every bad file gives a one-line CheckpointError."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from fastldm.loading.safetensors_io import CheckpointError, TensorReader, load_pickle, read_header


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)},
              str(p), metadata={"format": "pt"})
    return p


def test_reads_header_without_data(good):
    infos, meta = read_header(good)
    assert infos["a"].shape == (2, 3) and infos["a"].dtype == "F32" and infos["b"].dtype == "F16"
    assert meta == {"format": "pt"}
    assert torch.equal(TensorReader().get(infos["a"], "a"), torch.arange(6.0).reshape(2, 3))


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        read_header(tmp_path / "nope.safetensors")
    assert "no such file" in _one_line(e)


def test_not_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"this is a text file, not weights at all")
    with pytest.raises(CheckpointError) as e:
        read_header(p)
    assert "not a safetensors file" in _one_line(e)


def test_tiny_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_header(p)


def test_truncated(good, tmp_path):
    data = good.read_bytes()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[:-5])
    with pytest.raises(CheckpointError) as e:
        read_header(p)
    assert "truncated or corrupt" in _one_line(e)


def test_header_cut(good, tmp_path):
    p = tmp_path / "cut.safetensors"
    p.write_bytes(good.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(p)


def test_lying_header(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}).encode()
    p = tmp_path / "lie.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError) as e:
        read_header(p)
    assert "header lies about tensor 'w'" in _one_line(e)


def test_bad_json_header(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="header is not JSON"):
        read_header(p)


def test_pickle_refused_without_opt_in(tmp_path):
    p = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, p)
    with pytest.raises(CheckpointError) as e:
        load_pickle(p, allow_pickle=False)
    assert "allow_pickle=True" in _one_line(e)
    sd, meta = load_pickle(p, allow_pickle=True)
    assert torch.equal(sd["w"], torch.ones(2)) and meta == {}


def test_pickle_with_code_is_rejected_even_when_allowed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": Evil()}}, p, _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_pickle(p, allow_pickle=True)
