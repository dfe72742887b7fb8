"""``alpaca-lora ui``: serve the web UI (chat, train, runs) over run and model folders."""

from __future__ import annotations

import argparse
from typing import Any

from alpaca_lora.cli.flags import add_flag

_DESCRIPTION = ("Serve the web UI over run folders, model folders or folders that hold them (default: the "
                "current folder): chat with a tuned model beside its base, start, watch, stop and resume a "
                "fine-tune, browse runs and merge or export them. It listens on 127.0.0.1 unless --host says "
                "otherwise, reads nothing outside the folders given, and needs Gradio: "
                "pip install 'alpaca_lora[ui]'.")


def add_ui_parser(sub: Any) -> None:
    """Add the ``ui`` subcommand to the subparsers ``sub``."""
    from alpaca_lora.ui.app import DEFAULT_HOST, DEFAULT_PORT

    ui = sub.add_parser("ui", help="web UI: chat, train and watch runs, browse runs", description=_DESCRIPTION)
    ui.add_argument("folders", metavar="RUN_OR_MODEL", nargs="*",
                    help="run folders, model folders or folders that hold them (e.g. alpaca-lora-demo)")
    add_flag(ui, "host", str, DEFAULT_HOST, "address to listen on; anything but loopback prints a warning, as the "
             "page has no login")
    add_flag(ui, "port", int, DEFAULT_PORT, "port to listen on")
    add_flag(ui, "workspace", str, None, "where runs started from the UI, merges and exports go (default: the first "
             "folder)")
    ui.add_argument("--share", action="store_true", help="also make a public Gradio share link (off by default)")


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    from alpaca_lora.errors import ConfigError
    from alpaca_lora.ui.app import launch

    try:
        import gradio  # noqa: F401 - only checks that it is installed
    except ImportError:
        raise ConfigError("the web UI needs Gradio: pip install 'alpaca_lora[ui]' (or pip install gradio)") from None
    launch(args.folders, host=getattr(args, "host", "127.0.0.1"), port=getattr(args, "port", 7860),
           workspace=getattr(args, "workspace", None), share=args.share)
    return 0
