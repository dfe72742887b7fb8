"""The web UI: Chat, Train and Runs tabs over the folders given, served by Gradio on loopback.

Safe by default: it listens on 127.0.0.1 unless another host is asked for (then a warning says who can
reach it), makes no share link unless asked, sends no analytics, needs no network (Gradio's page is
bundled with the package, its fonts are local), and reads only inside the folders it was given
(:mod:`alpaca_lora.ui.paths`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from alpaca_lora.errors import ConfigError
from alpaca_lora.ui import chat, runs_tab, train_tab
from alpaca_lora.ui.paths import Folders
from alpaca_lora.ui.process import Trainer

logger = logging.getLogger(__name__)

TITLE = "alpaca-lora"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def exposure_warning(host: str) -> str | None:
    """The warning for a ``host`` other than loopback (None for loopback)."""
    if host in ("localhost", "") or _is_loopback(host):
        return None
    return (f"warning: listening on {host}, so other machines on the network can reach this UI: it has no login, "
            "and anyone who reaches it can chat with the models and start training runs. Use the default "
            f"--host {DEFAULT_HOST} (then an SSH tunnel, ssh -L 7860:localhost:7860) unless that is what you want.")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(folders: Folders, trainer: Trainer | None = None) -> Any:
    """The ``gr.Blocks`` page with the Chat, Train and Runs tabs over ``folders``."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio when imported: no usage reports
    import gradio as gr

    trainer = trainer or Trainer()
    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(f"## alpaca-lora · serving `{', '.join(str(r) for r in folders.roots)}` · new runs go to "
                    f"`{folders.workspace}`")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat.build(folders)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train_tab.build(folders, trainer, page)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                runs_tab.build(folders, page)
    page.trainer = trainer  # the runs it started, for callers that stop them (tests, notebooks)
    return page


def launch(
    folders: Iterable[str | Path] = (),
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workspace: str | Path | None = None,
    share: bool = False,
    block: bool = True,
) -> Any:
    """Serve the web UI over ``folders`` (runs, model folders, or folders holding them).

    Args:
        folders: What the UI serves: run folders, model folders, or folders that hold them (the current
            folder when none). It reads nothing outside them, except the embedded base and the bases
            their adapters record.
        host: The address to listen on; anything but loopback logs a warning (no login protects the page).
        port: The port (an error when another server holds it).
        workspace: Where runs started from the UI, merges and exports are written; default the first folder
            (its parent when that is itself a model folder).
        share: Ask Gradio for a public share link (off by default: the page has no login).
        block: Serve until interrupted; False returns at once (in a notebook), the server running beside it.

    Returns:
        The ``gr.Blocks`` page (``.close()`` stops the server; ``.trainer`` holds the runs it started).

    Raises:
        ConfigError: A folder that does not exist, or a port out of range.

    """
    if not 0 < int(port) < 65536:
        raise ConfigError(f"port={port}: must be in 1..65535 (e.g. the default {DEFAULT_PORT})")
    served = Folders.from_paths(folders, workspace)
    warning = exposure_warning(host)
    if warning:
        print(warning, file=sys.stderr)  # always shown, whatever the logging setup
    page = build_app(served)
    page.queue(default_concurrency_limit=4)
    page.launch(server_name=host, server_port=int(port), share=share, prevent_thread_lock=not block,
                inbrowser=False, ssr_mode=False, footer_links=[], quiet=False, show_error=True)
    return page
