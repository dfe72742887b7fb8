"""The web UI (``alpaca-lora ui``): chat with tuned models, start and watch fine-tunes, browse runs.

Built with Gradio, which is imported only when the UI is built (``pip install 'alpaca_lora[ui]'``).
"""

from __future__ import annotations

from typing import Any


def launch(*args: Any, **kwargs: Any) -> Any:
    """Serve the web UI; see :func:`alpaca_lora.ui.app.launch` for the arguments."""
    from alpaca_lora.ui.app import launch as _launch

    return _launch(*args, **kwargs)
