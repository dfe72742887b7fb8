"""The dtype the library's own autograd functions compute in under (or without) autocast."""

from __future__ import annotations

import torch


def active_compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype a hand-written autograd function computes in: autocast's when it is on, else ``default``.

    Read in the forward pass and kept for the backward pass, which autograd runs with autocast off.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default
