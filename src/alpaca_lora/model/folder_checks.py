"""Refuse a model folder before anything loads it: custom code it asks to run, entries that are no file.

Also finds the local folder of a model name (the folder itself or a Hub id's cached snapshot), so
those checks can run before transformers reads a byte of it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from alpaca_lora.errors import AlpacaLoraError, ModelError
from alpaca_lora.files import read_json

CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
"""Files of a model folder whose ``auto_map`` makes transformers import Python code from the folder."""


def refuse_custom_code(folder: str | Path, *, error: type[AlpacaLoraError] = ModelError) -> None:
    """Refuse a model folder that asks for its own Python code to run (``auto_map``), before anything loads it.

    Loading such a folder would import the folder's ``.py`` files (``trust_remote_code``); this library
    never does, and says so rather than letting transformers prompt on the terminal.
    """
    folder = Path(folder)
    for name in CODE_FILES:
        file = folder / name
        if not file.is_file():
            continue
        data = read_json(file, expect=object, error=error, fix="repair or remove the file")
        if isinstance(data, dict) and data.get("auto_map"):
            raise error(f"{folder} asks to run its own Python code ({name} has an auto_map entry); alpaca_lora never "
                        "runs code from a model folder (trust_remote_code stays False). Use a model whose "
                        "architecture transformers ships, or remove auto_map if the folder's config names one")


def local_model_folder(name: str | Path) -> Path | None:
    """A local folder for ``name``: the folder itself, or a Hub id's snapshot in the local cache; else None.

    Never reaches the network, so what it returns can be checked (:func:`refuse_custom_code`,
    :func:`check_weight_files`) before anything loads it.
    """
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            return path
    except OSError:  # a name too long for a path, or a folder we may not enter: not a local folder
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid id: nothing local
        return None


def refuse_special_files(folder: str | Path, *, error: type[AlpacaLoraError] = ModelError) -> None:
    """Refuse a folder with an entry that is neither a regular file nor a folder once links are followed.

    A device, FIFO or socket, reached directly or through a link (``config.json -> /dev/zero``), would
    make any reader of that name hang or read forever. Dangling links are left to whoever reads them
    (a missing file is reported as missing).
    """
    for entry in Path(folder).iterdir():
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            target = f" (a link to {os.readlink(entry)})" if entry.is_symlink() else ""
            raise error(f"{entry}{target} is a device, FIFO or socket, not a file: reading it would never end. "
                        "Replace it with the real file or remove it")
