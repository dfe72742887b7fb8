"""Padding-free packing: a micro-batch's records in one row, with no attention across records.

A padded micro-batch of records of lengths 40, 90 and 510 is a ``(3, 512)`` tensor: 896 of its
1,536 positions are padding, and every layer computes them. Packing puts the records end to end in
one ``(1, 640)`` row instead, so only real tokens are computed.

Packing by ``position_ids`` alone is not enough: a token would still attend to the records packed
before it (its logits then differ by ~0.6 from the unpacked ones). :class:`PackedCollator`
therefore also returns the record boundaries, ``cu_seq_lens`` (the layout flash-attention's varlen
kernels take), and ``position_ids`` that restart at 0 for every record, so rotary embeddings match
too. It builds no ``N x N`` mask: the batch costs O(N) in time and memory whatever the packed
length (a dense boolean mask of a 32k-token row alone is 1 GiB). :func:`body_kwargs` turns the
boundaries into Python ints once per micro-batch (:class:`PackedRecords`), and the record-wise
attention of :mod:`alpaca_lora.kernels.packed_attention` reads them in every layer without a host
sync. A model left on transformers' own sdpa or eager attention derives the same block mask from
the restarting ``position_ids`` inside its forward. The loss is the same as on the padded batch
(``tests/data/test_packing.py`` checks packed == unpacked to 1e-5).

The first label of every record is set to -100: in an unpacked row the first token is never a
target (position t predicts token t+1), and in a packed row it would otherwise become the target
of the previous record's last token, an example the unpacked model never sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.errors import ConfigError

PACKED_ATTENTION = "alpaca_lora_packed"
"""Name of the record-wise attention (:mod:`alpaca_lora.kernels.packed_attention`) in transformers' registry."""
PACKED_EAGER_ATTENTION = "alpaca_lora_packed_eager"
"""Name of the record-wise eager attention (a per-record mask instead of a per-row one)."""
# Attention kernels that take a 4D block mask as given: boolean (True = attend) or additive float.
_BOOL_MASK = {"sdpa", "flex_attention", PACKED_ATTENTION}
_FLOAT_MASK = {"eager", PACKED_EAGER_ATTENTION}
_MASK_KINDS = ("none", "bool", "float")


def attention_kind(model: Any) -> str:
    """Return ``"bool"`` or ``"float"``: the form of 4D mask the model's attention kernel accepts.

    Packed batches carry no 4D mask by default (see :class:`PackedCollator`); this also checks that the
    model's attention can tell records apart at all.

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


@dataclass(frozen=True, eq=False)
class PackedRecords:
    """The record boundaries of one packed row, as Python ints, handed to every attention layer.

    Built once per micro-batch by :func:`body_kwargs` (the only host sync for the boundaries), so
    the attention reads ``bounds`` in each layer without ``.tolist()`` on a device tensor.

    Attributes:
        bounds: ``(0, l1, l1 + l2, ..., N)``: record ``i`` is ``[bounds[i], bounds[i + 1])``.
        kernel: The record-wise attention kernel to use: ``"auto"``, ``"sdpa"`` (one causal sdpa per
            record), ``"flex"`` (FlexAttention with a document mask) or ``"flash"`` (flash-attn varlen);
            see :func:`alpaca_lora.kernels.packed_kernels.choose_kernel`.
        cache: What the kernels derive from ``bounds`` once per micro-batch and reuse in every layer
            (a FlexAttention block mask, the boundaries on the device, per-record eager masks).

    """

    bounds: tuple[int, ...]
    kernel: str = "auto"
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def spans(self) -> list[tuple[int, int]]:
        """``(start, end)`` of each non-empty record."""
        return [(a, b) for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True) if b > a]

    @property
    def max_length(self) -> int:
        """Length of the longest record."""
        return max((b - a for a, b in self.spans), default=0)


class PackedCollator:
    """Concatenate tokenized records into one ``(1, N)`` row with their boundaries; O(N), no ``N x N`` mask.

    Example, records of 3 and 2 tokens (labels -100 on the prompt token ``5``)::

        features = [{"input_ids": [5, 6, 2], "labels": [-100, 6, 2]},
                    {"input_ids": [7, 2], "labels": [7, 2]}]
        batch = PackedCollator()(features)
        batch["input_ids"]     # (1, 5) tensor([[5, 6, 2, 7, 2]])
        batch["position_ids"]  # (1, 5) tensor([[0, 1, 2, 0, 1]])
        batch["labels"]        # (1, 5) tensor([[-100, 6, 2, -100, 2]]): first label of each record dropped
        batch["cu_seq_lens"]   # tensor([0, 3, 5], dtype=torch.int32): record boundaries
        "attention_mask" in batch  # False: each record is causal on its own, nothing across

    With ``mask_kind="bool"`` or ``"float"`` the batch also has the dense block-diagonal causal mask of
    earlier versions, ``attention_mask`` of shape ``(1, 1, N, N)`` (True or 0.0 where a token may
    attend): the fallback for an attention implementation that reads nothing but a 4D mask. It costs
    the square of the packed row (1 GiB of booleans for 32k tokens).

    Args:
        mask_kind: ``"none"`` (the default: boundaries only), ``"bool"`` (True = attend; sdpa) or
            ``"float"`` (0 or the dtype's minimum, added to the scores; eager). :func:`attention_kind`
            tells which dense form a model takes.
        dtype: dtype of a ``"float"`` mask (the compute dtype).

    """

    def __init__(self, mask_kind: str = "none", dtype: torch.dtype = torch.float32) -> None:
        if mask_kind not in _MASK_KINDS:
            raise ValueError(f"mask_kind={mask_kind!r}: must be one of {_MASK_KINDS}")
        self.mask_kind = mask_kind
        self.dtype = dtype

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pack ``features`` (dicts with ``input_ids`` and optionally ``labels``) into one row."""
        if not features:
            raise ValueError("cannot pack an empty list of features")
        ids, labels, lengths = [], [], []
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
            lengths.append(len(row))
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)  # (R + 1,)
        n = int(cu[-1])
        starts = torch.repeat_interleave(cu[:-1].long(), torch.tensor(lengths), output_size=n)  # (N,)
        batch = {
            "input_ids": torch.cat(ids)[None],  # (1, N)
            "labels": torch.cat(labels)[None],  # (1, N)
            "position_ids": (torch.arange(n) - starts)[None],  # (1, N): 0, 1, ... within each record
            "cu_seq_lens": cu,
        }
        if self.mask_kind != "none":
            batch["attention_mask"] = _dense_block_mask(lengths, self.mask_kind, self.dtype)[None, None]
        return batch


def _dense_block_mask(lengths: list[int], kind: str, dtype: torch.dtype) -> torch.Tensor:
    """``(N, N)`` block-diagonal causal mask (the ``mask_kind="bool"``/``"float"`` fallback; O(N^2))."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # (N,)
    n = len(segment)
    mask = torch.ones(n, n, dtype=torch.bool).tril_() & (segment[:, None] == segment[None, :])  # (N, N)
    if kind == "float":
        mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).masked_fill(mask, 0.0)
    return mask


def body_kwargs(batch: dict[str, torch.Tensor], kernel: str = "auto") -> dict[str, Any]:
    """Keyword arguments for the decoder body beyond ids and mask: positions and record boundaries.

    The boundaries are read to the host here, once per micro-batch, as :class:`PackedRecords`
    (``packed_records``), which transformers hands to every attention layer; ``cu_seq_lens_q`` and
    friends are the same boundaries in the form flash-attention implementations read. ``use_cache``
    is off: a training forward needs no cache, and without one a model left on transformers' own sdpa
    or eager builds the block mask from the restarting ``position_ids`` itself.

    Args:
        batch: A collated batch; one with ``cu_seq_lens`` is packed.
        kernel: The record-wise attention kernel (see :class:`PackedRecords`).

    """
    if "position_ids" not in batch:
        return {}
    extra: dict[str, Any] = {"position_ids": batch["position_ids"]}
    if "cu_seq_lens" in batch:
        cu = batch["cu_seq_lens"]
        records = PackedRecords(tuple(cu.tolist()), kernel)
        longest = records.max_length
        extra.update(use_cache=False, packed_records=records, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                     max_length_k=longest)
    return extra


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a padded or packed batch."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())
