"""Push an exported folder to the Hugging Face Hub: an allow-list of files, a token that never leaks."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

from alpaca_lora.errors import AlpacaLoraError, ConfigError, ModelError, shown
from alpaca_lora.export import layout as art
from alpaca_lora.export.merge import EXPORT_FILES
from alpaca_lora.export.merge import SHARD_NAME as _SHARD_NAME

logger = logging.getLogger(__name__)


def export_files(folder: str | Path) -> list[str]:
    """Return the files of ``folder`` that :func:`push_to_hub` uploads (top level, allow-listed), sorted.

    Merged weights (``model.safetensors`` or ``model-0000N-of-0000M.safetensors``), configs,
    tokenizer, prompt template, model card, merge report and, for an adapter folder, the adapter and
    its run records. Anything else (``.env``, ``checkpoint-N/``, ``*.bin``, notes) is never uploaded.

    Only regular files are uploaded. An allow-listed name that is a symbolic link is refused, wherever
    it points: a link could send any file of this machine (``model.safetensors -> /etc/shadow``) to
    the Hub under an innocent name. ``folder`` itself may be a link.

    Raises:
        ModelError: An allow-listed name is a symbolic link (or not a regular file); the message
            names it and its target, and says to copy the file in.

    """
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.name in EXPORT_FILES or _SHARD_NAME.fullmatch(p.name))
    links = [f"{n} -> {os.readlink(folder / n)}" for n in names if (folder / n).is_symlink()]
    if links:
        raise ModelError(f"{folder} has symbolic links among the files to upload ({shown(links, 400)}); only regular "
                         "files are uploaded, so that a link cannot send a file from elsewhere on this machine. Copy "
                         "the files in (cp --dereference) after checking what they are, or remove the links")
    return [n for n in names if (folder / n).is_file()]


def _open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading, refusing a symbolic link even if one replaced the file after listing."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ModelError(f"cannot open {path} for upload ({exc.strerror}); it changed or became a symbolic link "
                         "after it was listed: check the folder and push again") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelError(f"{path} is not a regular file; only regular files are uploaded")
    return os.fdopen(fd, "rb")


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = True,
    dry_run: bool = False,
    commit_message: str = "Upload model exported with alpaca_lora",
) -> list[str]:
    """Upload a merged (or adapter) folder to a Hugging Face Hub model repository.

    Only the files :func:`export_files` lists are uploaded, in one commit. The repository is created
    (private by default) when missing. ``HF_ENDPOINT`` is read at call time.

    Args:
        folder: A folder written by :func:`merge` or :func:`alpaca_lora.finetune`.
        repo_id: ``"user/name"`` or ``"org/name"``.
        token: A write token; else ``HF_TOKEN``, else the token saved by ``hf auth login``. It is never
            printed, logged, written or put in an error message.
        private: Create the repository as private (ignored when it exists).
        dry_run: Return the file list without touching the network (no token needed).
        commit_message: The commit's summary.

    Returns:
        The uploaded file names (relative to ``folder``), sorted.

    Raises:
        ConfigError: A bad ``repo_id`` or no token available.
        ModelError: The folder holds nothing to upload, or an allow-listed name is a symbolic link.
        AlpacaLoraError: The Hub refused the upload (message without the token).

    """
    folder = Path(folder)
    if not isinstance(repo_id, str) or not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo_id):
        raise ConfigError(f"repo_id={repo_id!r}: give 'user/name' (letters, digits, '-', '_', '.')")
    files = export_files(folder) if folder.is_dir() else []
    if not any(_SHARD_NAME.fullmatch(f) or f == art.ADAPTER_WEIGHTS for f in files):
        raise ModelError(f"{folder} holds no model weights to upload; pass a folder written by merge() or finetune()")
    if dry_run:
        return files
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    secret = token or os.environ.get("HF_TOKEN") or get_token()
    if not secret:
        raise ConfigError("no Hugging Face token: pass token=, set the HF_TOKEN environment variable, or run "
                          "`hf auth login` once (a token with write access)")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=secret)
    logger.info("uploading %d files from %s to %s (private=%s)", len(files), folder, repo_id, private)
    failure = None
    with contextlib.ExitStack() as opened:
        handles = {f: opened.enter_context(_open_regular(folder / f)) for f in files}  # the bytes listed, no link
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=handles[f]) for f in files]
            api.create_commit(url.repo_id, operations=ops, commit_message=commit_message, repo_type="model")
        except Exception as exc:  # hub, network and auth errors alike
            failure = f"{type(exc).__name__}: {exc}".replace(secret, "***")
    if failure is not None:  # raised outside the except block: no __context__ that could hold the token
        raise AlpacaLoraError(f"upload of {folder} to {repo_id} failed ({failure}); check the token has write "
                              "access, the repo id and the network (HF_ENDPOINT)")
    return files
