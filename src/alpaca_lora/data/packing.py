"""Padding-free packing: a micro-batch's records in one row, with no attention across records.

A padded micro-batch of records of lengths 40, 90 and 510 is a ``(3, 512)`` tensor: 896 of its
1,536 positions are padding, and every layer computes them. Packing puts the records end to end in
one ``(1, 640)`` row instead, so only real tokens are computed.

Packing by ``position_ids`` alone is not enough: with the sdpa or eager attention, a token would
still attend to the records packed before it (its logits then differ by ~0.6 from the unpacked
ones). :class:`PackedCollator` therefore also builds a block-diagonal causal mask, ``(1, 1, N, N)``,
in which each token sees only the earlier tokens of its own record; ``position_ids`` restart at 0
for every record, so rotary embeddings match too. The loss is then the same as on the padded
batch (``tests/data/test_packing.py`` checks packed == unpacked to 1e-5).

Records are packed end to end, so the block mask costs the square of the packed row;
:mod:`alpaca_lora.kernels.packed_attention` holds the attention function that costs each record's
own square instead.

The first label of every record is set to -100: in an unpacked row the first token is never a
target (position t predicts token t+1), and in a packed row it would otherwise become the target
of the previous record's last token, an example the unpacked model never sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.errors import ConfigError

PACKED_ATTENTION = "alpaca_lora_packed"
"""Name of the record-wise attention (:mod:`alpaca_lora.kernels.packed_attention`) in transformers' registry."""
# Attention kernels that take the 4D block mask as given: boolean (True = attend) or additive float.
_BOOL_MASK = {"sdpa", "flex_attention", PACKED_ATTENTION}
_FLOAT_MASK = {"eager"}


def attention_kind(model: Any) -> str:
    """Return ``"bool"`` or ``"float"``: the form of 4D mask the model's attention kernel accepts.

    Raises:
        ConfigError: The attention implementation cannot take a custom 4D mask (then pass
            ``packing=False``).

    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl in _BOOL_MASK:
        return "bool"
    if impl in _FLOAT_MASK:
        return "float"
    raise ConfigError(
        f"packing=True needs an attention implementation that takes a 4D mask (sdpa or eager), but the model "
        f"uses {impl!r}; load it with attn_implementation='sdpa' or set packing=False"
    )


class PackedCollator:
    """Concatenate tokenized records into one ``(1, N)`` row with a block-diagonal causal mask.

    Example, records of 3 and 2 tokens (labels -100 on the prompt token ``5``)::

        features = [{"input_ids": [5, 6, 2], "labels": [-100, 6, 2]},
                    {"input_ids": [7, 2], "labels": [7, 2]}]
        batch = PackedCollator()(features)
        batch["input_ids"]     # (1, 5) tensor([[5, 6, 2, 7, 2]])
        batch["position_ids"]  # (1, 5) tensor([[0, 1, 2, 0, 1]])
        batch["labels"]        # (1, 5) tensor([[-100, 6, 2, -100, 2]]): first label of each record dropped
        batch["cu_seq_lens"]   # tensor([0, 3, 5], dtype=torch.int32): record boundaries
        batch["attention_mask"][0, 0].int()  # (5, 5): causal inside each record, nothing across
        # tensor([[1, 0, 0, 0, 0],
        #         [1, 1, 0, 0, 0],
        #         [1, 1, 1, 0, 0],
        #         [0, 0, 0, 1, 0],
        #         [0, 0, 0, 1, 1]])

    Args:
        mask_kind: ``"bool"`` (True = attend; sdpa) or ``"float"`` (0 or the dtype's minimum, added
            to the scores; eager). :func:`attention_kind` tells which a model needs.
        dtype: dtype of a ``"float"`` mask (the compute dtype).

    """

    def __init__(self, mask_kind: str = "bool", dtype: torch.dtype = torch.float32) -> None:
        if mask_kind not in ("bool", "float"):
            raise ValueError(f"mask_kind={mask_kind!r}: must be 'bool' or 'float'")
        self.mask_kind = mask_kind
        self.dtype = dtype

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pack ``features`` (dicts with ``input_ids`` and optionally ``labels``) into one row."""
        if not features:
            raise ValueError("cannot pack an empty list of features")
        ids, labels, positions, segments = [], [], [], []
        for index, feature in enumerate(features):
            if "input_ids" not in feature:
                raise ValueError(f"feature {index} has no 'input_ids' (keys: {sorted(feature)})")
            row = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            lab = torch.as_tensor(feature.get("labels", row), dtype=torch.long).clone()
            if row.ndim != 1 or lab.shape != row.shape or len(row) == 0:
                raise ValueError(f"feature {index}: input_ids and labels must be non-empty flat lists of equal length")
            lab[0] = IGNORE_INDEX
            ids.append(row)
            labels.append(lab)
            positions.append(torch.arange(len(row)))
            segments.append(torch.full((len(row),), index))
        segment = torch.cat(segments)  # (N,)
        n = len(segment)
        causal = torch.ones(n, n, dtype=torch.bool).tril_()  # (N, N)
        mask = causal & (segment[:, None] == segment[None, :])  # (N, N)
        if self.mask_kind == "float":
            blocked = torch.full((n, n), torch.finfo(self.dtype).min, dtype=self.dtype)
            mask = blocked.masked_fill(mask, 0.0)
        return {
            "input_ids": torch.cat(ids)[None],  # (1, N)
            "labels": torch.cat(labels)[None],  # (1, N)
            "position_ids": torch.cat(positions)[None],  # (1, N)
            "attention_mask": mask[None, None],  # (1, 1, N, N)
            "cu_seq_lens": torch.tensor([0] + [len(r) for r in ids], dtype=torch.int32).cumsum(0, dtype=torch.int32),
        }


def body_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments for the decoder body beyond ids and mask: positions and record boundaries."""
    if "position_ids" not in batch:
        return {}
    extra: dict[str, Any] = {"position_ids": batch["position_ids"]}
    if "cu_seq_lens" in batch:
        cu = batch["cu_seq_lens"]
        longest = int((cu[1:] - cu[:-1]).max())
        extra.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return extra


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a padded or packed batch."""
    mask = batch["attention_mask"]
    if mask.ndim == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())
