"""The floating-point dtypes options name (compute_dtype, merge's dtype), by name: the one table of them."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Dtype name -> ``torch.dtype`` for every option that names a floating-point dtype."""
