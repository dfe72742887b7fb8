"""Padding-free packing: a packed micro-batch gives the same loss and gradients as the padded one."""

import time
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from alpaca_lora import ConfigError
from alpaca_lora.data.collator import InstructionCollator
from alpaca_lora.data.packing import (
    PACKED_ATTENTION,
    PACKED_EAGER_ATTENTION,
    PackedCollator,
    PackedRecords,
    attention_kind,
    batch_tokens,
    body_kwargs,
)
from alpaca_lora.kernels.cross_entropy import token_losses_sum
from alpaca_lora.kernels.packed_attention import use_packed_attention
from alpaca_lora.train.recipe import finetune

FEATURES = [
    {"input_ids": [5, 6, 7, 2], "labels": [-100, -100, 7, 2], "attention_mask": [1, 1, 1, 1]},
    {"input_ids": [9, 2], "labels": [9, 2], "attention_mask": [1, 1]},  # train_on_inputs: first label set
    {"input_ids": [3, 4, 8, 8, 1, 2], "labels": [-100, 4, 8, 8, 1, 2], "attention_mask": [1] * 6},
]


class _Tok:
    pad_token_id = 2
    eos_token_id = 2


def _model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(config)


def test_packed_batch_layout_matches_the_docstring_example():
    features = [{"input_ids": [5, 6, 2], "labels": [-100, 6, 2]}, {"input_ids": [7, 2], "labels": [7, 2]}]
    batch = PackedCollator()(features)
    assert batch["input_ids"].tolist() == [[5, 6, 2, 7, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 2, -100, 2]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5] and batch["cu_seq_lens"].dtype == torch.int32
    assert "attention_mask" not in batch  # no N x N mask: the boundaries carry the blocks
    assert batch_tokens(batch) == 5


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_the_dense_mask_fallback_is_the_block_diagonal_causal_mask(kind):
    features = [{"input_ids": [5, 6, 2], "labels": [-100, 6, 2]}, {"input_ids": [7, 2], "labels": [7, 2]}]
    batch = PackedCollator(kind)(features)
    allowed = batch["attention_mask"][0, 0] if kind == "bool" else batch["attention_mask"][0, 0] == 0
    assert allowed.int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert batch_tokens(batch) == 5
    with pytest.raises(ValueError, match="mask_kind"):
        PackedCollator("dense")


def test_body_kwargs_reads_the_boundaries_once_as_python_ints():
    kwargs = body_kwargs(PackedCollator()(FEATURES), kernel="sdpa")
    records = kwargs["packed_records"]
    assert isinstance(records, PackedRecords) and records.kernel == "sdpa"
    assert records.bounds == (0, 4, 6, 12) and all(type(b) is int for b in records.bounds)
    assert records.spans == [(0, 4), (4, 6), (6, 12)] and records.max_length == kwargs["max_length_q"] == 6
    assert body_kwargs(InstructionCollator(_Tok())(FEATURES)) == {}  # padded: nothing extra


_SWITCHED = {PACKED_ATTENTION: "sdpa", PACKED_EAGER_ATTENTION: "eager"}


@pytest.mark.parametrize("dense", [False, True], ids=["boundaries", "dense_mask"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_ATTENTION, PACKED_EAGER_ATTENTION])
def test_packed_loss_and_gradients_equal_padded(attn, dense):
    """Every attention, with the boundaries alone or the dense fallback mask: the padded loss and gradients (fp32)."""
    model = _model(_SWITCHED.get(attn, attn))
    if attn in _SWITCHED:
        assert use_packed_attention(model) and model.config._attn_implementation == attn
    padded = InstructionCollator(_Tok(), pad_to_multiple_of=8)(FEATURES)
    packed = PackedCollator(attention_kind(model) if dense else "none")(FEATURES)
    assert batch_tokens(padded) == batch_tokens(packed) == 12
    s_pad, n_pad = token_losses_sum(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
    s_pad.backward()
    g_pad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    s_pack, n_pack = token_losses_sum(model, packed["input_ids"], packed.get("attention_mask"), packed["labels"],
                                      **body_kwargs(packed))
    s_pack.backward()
    assert n_pack == n_pad == 8
    assert abs(float(s_pack.detach()) - float(s_pad.detach())) < 1e-5 * n_pad
    for a, p in zip(g_pad, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)


def test_packing_without_the_block_mask_would_leak_across_records():
    """The invariant above is not vacuous: position_ids alone let records see each other."""
    model = _model("sdpa")
    packed = PackedCollator()(FEATURES)
    padded = InstructionCollator(_Tok())(FEATURES)
    s_pad, _ = token_losses_sum(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
    ones = torch.ones_like(packed["input_ids"])
    s_leak, _ = token_losses_sum(model, packed["input_ids"], ones, packed["labels"],
                                 position_ids=packed["position_ids"])
    assert abs(float(s_leak) - float(s_pad)) > 1e-3


def test_record_wise_attention_ignores_the_dense_mask_when_given_boundaries():
    """With boundaries, the packed attention never looks at the N x N mask: an all-ones mask gives the same loss."""
    model = _model("sdpa")
    use_packed_attention(model)
    packed = PackedCollator("bool")(FEATURES)
    ones = torch.ones_like(packed["attention_mask"])
    with torch.no_grad():
        a, _ = token_losses_sum(model, packed["input_ids"], packed["attention_mask"], packed["labels"],
                                **body_kwargs(packed))
        b, _ = token_losses_sum(model, packed["input_ids"], ones, packed["labels"], **body_kwargs(packed))
    assert abs(float(a) - float(b)) < 1e-6


def test_unsupported_attention_is_refused_with_the_fix():
    model = _model("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="packing=False"):
        attention_kind(model)


def test_packed_and_padded_training_give_the_same_adapter(tiny_model_dir, tmp_path):
    records = [{"instruction": f"Say {w} {'twice ' * i}", "input": "", "output": f"{w} " * (i + 1)}
               for i, w in enumerate(["red", "green", "blue", "cyan", "pink", "gray", "teal", "gold"])]
    # Adam moves every weight by up to ~lr whatever its gradient's size, so float-level differences
    # in a near-zero gradient show up at the scale of lr: compare at a small lr.
    # fp32: bf16 and fp16 are covered micro-batch by micro-batch in test_precision.py
    common = dict(max_steps=3, batch_size=8, micro_batch_size=4, learning_rate=1e-3, lora_dropout=0.0,
                  compute_dtype="float32",
                  val_set_size=0, cutoff_len=64, gradient_checkpointing=True, save_steps=1000)
    a = finetune(tiny_model_dir, records, tmp_path / "packed", packing=True, **common)
    b = finetune(tiny_model_dir, records, tmp_path / "padded", packing=False, **common)
    assert a.tokens_seen == b.tokens_seen
    wa = load_file(str(tmp_path / "packed" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "padded" / "adapter_model.safetensors"))
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"packed vs padded adapter max abs diff after 3 steps: {diff:.2e}")
    assert diff < 1e-5
    assert abs(a.train_loss - b.train_loss) < 1e-4


def test_record_label_counts_add_up_to_the_collated_batch_count_padded_and_packed():
    """The loop counts a step's label tokens from its records before collating: the sum must be the batch's count."""
    from alpaca_lora.data.labels import count_label_tokens, record_label_tokens

    expected = sum(record_label_tokens(f["labels"]) for f in FEATURES)
    assert expected > 0
    assert count_label_tokens(InstructionCollator(_Tok(), pad_to_multiple_of=8)(FEATURES)["labels"]) == expected
    assert count_label_tokens(PackedCollator()(FEATURES)["labels"]) == expected


def _collate_cost(collate: PackedCollator, features: list[dict]) -> tuple[float, int, int]:
    """Best-of-5 seconds, bytes torch allocates (intermediates included) and Python's traced peak of one call."""
    collate(features)  # warm-up
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        collate(features)
        seconds.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        collate(features)
    torch_bytes = sum(max(0, e.cpu_memory_usage) for e in prof.key_averages())
    tracemalloc.start()
    collate(features)
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return min(seconds), torch_bytes, python_peak


def test_collator_time_and_memory_grow_linearly_with_the_packed_length():
    """1k to 32k tokens: the batch's bytes are exactly 24 per token; allocations and time per token stay flat.

    The dense (N, N) mask of earlier versions alone was N^2 bytes: 1 GiB at 32k, and seconds of work.
    """
    collate, figures = PackedCollator(), {}
    for n in (1024, 4096, 16384, 32768):
        features = [{"input_ids": list(range(3, 259)), "labels": list(range(3, 259))} for _ in range(n // 256)]
        batch = collate(features)
        tensor_bytes = sum(t.nbytes for t in batch.values())
        assert tensor_bytes == 3 * 8 * n + 4 * (n // 256 + 1)  # ids, labels, positions (int64) + int32 boundaries
        figures[n] = (*_collate_cost(collate, features), tensor_bytes)
    for n, (seconds, torch_bytes, python_peak, tensor_bytes) in figures.items():
        print(f"collate {n:>6} tokens: {seconds * 1e3:7.2f} ms, batch {tensor_bytes:>9} B, torch allocations "
              f"{torch_bytes:>9} B, Python peak {python_peak:>7} B")
    s1, b1, _, _ = figures[1024]
    for n, (seconds, torch_bytes, python_peak, _) in figures.items():
        assert torch_bytes / n <= 1.1 * b1 / 1024, (n, torch_bytes)  # linear to within 10%
        assert python_peak <= 8 * n + 16384, (n, python_peak)
        # Linear with slack for a shared machine: 20 ms absolute; the dense mask took seconds at 32k.
        assert seconds <= 3 * (n / 1024) * s1 + 0.02, (n, seconds)


class _HostSyncs(TorchFunctionMode):
    """Counts the tensor methods that copy a value to the host (a sync on CUDA) inside its ``with`` block."""

    NAMES = frozenset({"tolist", "item", "__bool__", "__int__", "__float__", "nonzero"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.NAMES
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attn", [PACKED_ATTENTION, PACKED_EAGER_ATTENTION])
def test_packed_attention_reads_no_boundaries_from_tensors_in_its_layers(attn):
    """The boundaries cross to the host once, in body_kwargs; the layers' attention reads Python ints.

    The forward's count does not grow with the layers: at most transformers' one check of the
    ``position_ids`` for restarts, per forward. Handing the layers only the ``cu_seq_lens_q`` tensor (the
    older interface) costs one read per layer more, which the counter sees, so the flat count is not
    for want of looking.
    """
    packed = PackedCollator()(FEATURES)
    counts = {}
    for layers in (2, 4):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, attn_implementation=_SWITCHED[attn])
        model = LlamaForCausalLM(config)
        assert use_packed_attention(model)
        kwargs = body_kwargs(packed)
        with _HostSyncs() as syncs, torch.no_grad():
            model.model(input_ids=packed["input_ids"], **kwargs)
        tensors_only = {k: v for k, v in kwargs.items() if k != "packed_records"}
        with _HostSyncs() as legacy, torch.no_grad():
            model.model(input_ids=packed["input_ids"], **tensors_only)
        counts[layers] = (syncs.count, legacy.count)
    print(f"host syncs per forward (2 layers, 4 layers), Python boundaries vs tensor boundaries: {counts}")
    assert counts[2][0] == counts[4][0] <= 1
    assert counts[2][1] == counts[2][0] + 2 and counts[4][1] == counts[4][0] + 4
