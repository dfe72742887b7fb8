"""InstructionCollator: right padding, labels padded by position, pad id == EOS id keeps the EOS label."""

from __future__ import annotations

import pytest
import torch

from alpaca_lora.data.collator import InstructionCollator
from alpaca_lora.data.pipeline import prepare_dataset
from alpaca_lora.data.prepare import load_instructions, tokenize_instruction
from alpaca_lora.errors import ModelError


class Tok:
    def __init__(self, pad: int | None = 2, eos: int | None = 2) -> None:
        self.pad_token_id, self.eos_token_id = pad, eos


DOC_FEATURES = [
    {"input_ids": [5, 6, 2], "labels": [-100, 6, 2], "attention_mask": [1, 1, 1]},
    {"input_ids": [5, 7, 8, 9, 2], "labels": [-100, -100, 8, 9, 2], "attention_mask": [1, 1, 1, 1, 1]},
]


def test_docstring_example():
    batch = InstructionCollator(Tok())(DOC_FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 2, 2, 2, 2, 2, 2], [5, 7, 8, 9, 2, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 2, -100, -100, -100, -100, -100],
                                        [-100, -100, 8, 9, 2, -100, -100, -100]]
    assert all(t.dtype == torch.long and t.shape == (2, 8) for t in batch.values())
    # The class docstring shows exactly these tensors.
    doc = InstructionCollator.__doc__
    assert "[5, 6, 2, 2, 2, 2, 2, 2]" in doc and "[-100,    6,    2, -100, -100, -100, -100, -100]" in doc


@pytest.mark.parametrize(("lengths", "multiple", "width"),
                         [((3, 5), 8, 8), ((8,), 8, 8), ((9, 1), 8, 16), ((17,), 16, 32), ((3, 5), None, 5),
                          ((3, 5), 1, 5), ((7,), 3, 9)])
def test_padded_width_is_longest_rounded_up(lengths, multiple, width):
    feats = [{"input_ids": list(range(10, 10 + n)), "labels": list(range(10, 10 + n))} for n in lengths]
    batch = InstructionCollator(Tok(pad=0), pad_to_multiple_of=multiple)(feats)
    assert all(t.shape == (len(lengths), width) for t in batch.values())
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)  # 0 exactly on padding
        assert batch["input_ids"][row, n:].eq(0).all() and batch["labels"][row, n:].eq(-100).all()


def test_labels_are_padded_by_position_not_by_id():
    # Label values that equal the pad id are real labels and must survive; a custom pad label is used.
    feats = [{"input_ids": [0, 0, 0], "labels": [0, -100, 0]}, {"input_ids": [4], "labels": [0]}]
    batch = InstructionCollator(Tok(pad=0, eos=1), pad_to_multiple_of=None, label_pad_token_id=-1)(feats)
    assert batch["labels"].tolist() == [[0, -100, 0], [0, -1, -1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_real_tokenizer_with_pad_equal_eos_keeps_every_real_eos_label(smol_tokenizer):
    tok = smol_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == 2  # the dangerous case (transformers#23530, trl#976)
    records = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
               {"instruction": "Add.", "input": "2 and 40", "output": "The sum is 42, since 2 + 40 = 42."},
               {"instruction": "Say nothing but OK.", "input": "", "output": "OK"}]
    feats = [tokenize_instruction(r, tok, cutoff_len=256) for r in records]
    batch = InstructionCollator(tok)(feats)
    lengths = [len(f["input_ids"]) for f in feats]
    assert batch["input_ids"].shape[1] == -(-max(lengths) // 8) * 8
    for row, (f, n) in enumerate(zip(feats, lengths, strict=True)):
        assert batch["input_ids"][row, :n].tolist() == f["input_ids"]
        assert batch["labels"][row, :n].tolist() == f["labels"]
        assert batch["labels"][row, n - 1] == tok.eos_token_id  # the real EOS is trained on
        assert batch["labels"][row, n:].eq(-100).all()  # every pad (also id 2) is ignored
        assert batch["input_ids"][row, n:].eq(tok.pad_token_id).all()
        assert batch["attention_mask"][row].sum() == n
    # Exactly one EOS label per row, although the padded input_ids hold many id-2 tokens.
    assert (batch["labels"] == tok.eos_token_id).sum(dim=1).tolist() == [1, 1, 1]
    assert (batch["input_ids"] == tok.eos_token_id).sum() > 3


def test_dataset_rows_with_extra_keys_and_tensors(smol_tokenizer):
    ds, _ = prepare_dataset(load_instructions([{"instruction": "a", "output": "b"},
                                               {"instruction": "longer one", "output": "c d e"}]),
                            smol_tokenizer, cutoff_len=64)
    rows = [ds[i] for i in range(len(ds))]
    assert "length" in rows[0]
    batch = InstructionCollator(smol_tokenizer)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["attention_mask"].sum(1).tolist() == [r["length"] for r in rows]
    as_tensors = [{k: torch.tensor(v) for k, v in r.items() if k != "length"} for r in rows]
    again = InstructionCollator(smol_tokenizer)(as_tensors)
    assert all(torch.equal(batch[k], again[k]) for k in batch)


def test_optional_mask_and_labels():
    batch = InstructionCollator(Tok())([{"input_ids": [5, 6]}, {"input_ids": [7]}])
    assert "labels" not in batch
    assert batch["attention_mask"][:, :2].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="labels to all or none"):
        InstructionCollator(Tok())([{"input_ids": [5], "labels": [5]}, {"input_ids": [7]}])


@pytest.mark.parametrize("bad", [{"input_ids": [1, 2, 3], "labels": [1, 2]},
                                 {"input_ids": [1, 2, 3], "labels": [1, 2, 3], "attention_mask": [1, 1]}])
def test_mismatched_lengths_are_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"feature 1 has input_ids of length 3") as info:
        InstructionCollator(Tok())([DOC_FEATURES[0], bad])
    assert "must be equal" in str(info.value)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        InstructionCollator(Tok())([])
    with pytest.raises(ValueError, match="no 'input_ids'"):
        InstructionCollator(Tok())([{"labels": [1]}])
    with pytest.raises(ValueError, match="flat"):
        InstructionCollator(Tok())([{"input_ids": [[1, 2]], "labels": [[1, 2]]}])
    for multiple in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="pad_to_multiple_of"):
            InstructionCollator(Tok(), pad_to_multiple_of=multiple)


def test_pad_id_falls_back_to_eos_and_fails_without_either():
    assert InstructionCollator(Tok(pad=None, eos=7)).pad_token_id == 7
    assert InstructionCollator(Tok(pad=0, eos=7)).pad_token_id == 0
    with pytest.raises(ModelError, match="neither a pad token nor an EOS token"):
        InstructionCollator(Tok(pad=None, eos=None))
