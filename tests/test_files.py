"""files: every JSON and safetensors file read back ends in our error naming it, or loads."""

import json
import os
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

from alpaca_lora.errors import CheckpointError, ModelError
from alpaca_lora.files import load_safetensors, read_json, safetensors_header


def test_a_fifo_named_like_a_json_file_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "adapter_config.json"
    os.mkfifo(fifo)
    done = []
    reader = threading.Thread(target=lambda: done.append(pytest.raises(ModelError, read_json, fifo)), daemon=True)
    reader.start()
    reader.join(5)
    assert done, "read_json blocked on a FIFO"
    assert "not a regular file" in str(done[0].value)


@pytest.mark.parametrize(("text", "expect", "said"), [
    ("[1]", dict, "where a JSON object was expected"), ('"x"', dict, "where a JSON object was expected"),
    ("true", int, "where a JSON integer was expected"), ("{", dict, "is not valid JSON"),
    ("[" * 100_000, list, "is not valid JSON")])
def test_read_json_names_the_file_and_what_is_wrong(tmp_path, text, expect, said):
    path = tmp_path / "f.json"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=said) as info:
        read_json(path, expect=expect, error=CheckpointError)
    assert str(path) in str(info.value) and len(str(info.value)) < 500


def test_safetensors_headers_are_checked_before_any_tensor_is_read(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3)}, str(path))
    assert set(load_safetensors(path)) == {"a", "b"}
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    for cut in (0, 4, 8, 8 + size - 1, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelError, match="w.safetensors"):
            safetensors_header(path)
    header = data[8:8 + size].replace(b'"F32"', b'"F64"', 1)  # twice the bytes the offsets give
    path.write_bytes(data[:8] + header + data[8 + size:])
    with pytest.raises(ModelError, match="bytes for the shape"):
        load_safetensors(path)


def test_an_oversized_json_file_is_refused_by_size(tmp_path, monkeypatch):
    monkeypatch.setattr("alpaca_lora.files.MAX_JSON_BYTES", 100)
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"k": "v" * 200}))
    with pytest.raises(ModelError, match=r"big.json is 2\d\d bytes, more than the 100"):
        read_json(path)
