"""Switch parts of a model between training and inference behaviour for a block, then restore them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def checkpointing_paused(model: torch.nn.Module) -> Iterator[None]:
    """Run the layers without gradient checkpointing inside the block (for no-grad forwards).

    A no-grad forward (evaluation, generation) has nothing to recompute, so the checkpoint wrappers
    would only add their bookkeeping. The layers' own flags are restored on exit.
    """
    paused = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in paused:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in paused:
            m.gradient_checkpointing = True


@contextlib.contextmanager
def dropout_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Switch only the model's ``nn.Dropout`` layers to eval mode inside the block; restore them on exit.

    Not ``model.eval()``: it would put bitsandbytes 4-bit layers in inference mode too, and on the CPU
    their first inference forward repacks the weights in place, so later training forwards read them wrongly.
    """
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in dropouts:
        m.eval()
    try:
        yield
    finally:
        for m in dropouts:
            m.train()
