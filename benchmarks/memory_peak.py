"""Measure the peak memory of LoRA training steps on the CPU and compare it with estimate_memory().

What is measured: the resident set size (RSS) of one fresh Python process. ``VmHWM`` (its
high-water mark) is read from ``/proc/self/status``:

1. ``baseline``: RSS after importing torch, transformers, peft, bitsandbytes and alpaca_lora (the
   interpreter and libraries; on a GPU this part lives in host memory, not device memory);
2. the base is loaded with ``load_model`` (4-bit NF4 + double quantization by default, fp32 compute)
   and LoRA attached with ``attach_lora``, exactly as ``finetune`` does (with ``cpu_matmul="auto"``,
   the 4-bit layers' products go through oneDNN where it measured faster);
3. tensors left memory-mapped from the weights file are copied and the heap trimmed (see
   ``_release_file_mapping``), then the high-water mark is reset (``echo 5 > /proc/self/clear_refs``),
   so the one-off peak of reading the fp32 safetensors file while quantizing it is left out: on a
   GPU that happens in host memory;
4. AdamW's state is created, then ``steps`` optimizer steps (one by default) run on one
   micro-batch of ``micro_batch x cutoff_len`` random tokens,
   every position a label (the worst case for the label-only loss), through the same
   ``token_losses_sum`` and AdamW as ``train_step``;
5. ``measured = VmHWM - baseline``: the model, the LoRA weights, gradients, optimizer state, the
   activations and the loss chunk at the worst moment of a step, plus what the CPU runtime adds
   (allocator caching, thread-pool scratch), which the estimate's ``workspace`` part stands for.

The measured interpreter runs with ``MALLOC_MMAP_THRESHOLD_=131072`` (see ``MALLOC_ENV``) so that
glibc hands freed blocks back to the OS and RSS follows the memory the tensors occupy. With the
default settings glibc keeps freed per-layer buffers cached and the same SmolLM2-135M step peaks
about 1.9x higher (1712 MB instead of 891 MB at 4 x 256 tokens, two steps each): that is what
``top`` shows for a CPU run, but no GPU allocator behaves that way.

On the CPU each 4-bit weight is dequantized to a temporary fp32 matrix in every forward and
backward; that matrix is freed after use, so it adds one weight matrix at a time.

Usage::

    python benchmarks/memory_peak.py --base-model FOLDER --micro-batch 4 --cutoff-len 256 [--no-gc]
    python benchmarks/memory_peak.py --table    # the configurations of docs/memory.md (tiny and 135M)

Each measurement prints one JSON line: the config, measured and estimated MB, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 1024**2
# glibc returns blocks above 128 KiB to the OS when freed (its default threshold rises to 32 MiB as
# a process frees large blocks, and freed heap blocks below it stay in RSS): RSS then tracks the
# memory tensors occupy, as a GPU's allocated bytes do, instead of what malloc keeps cached.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _release_file_mapping(model: object) -> None:
    """Copy the tensors transformers left memory-mapped from the safetensors file, then trim the heap.

    On the CPU, full-precision tensors (embeddings, norms) can stay views of the mapped weights
    file, and while the mapping lives every page of the file read during loading (all 538 MB of
    SmolLM2's fp32 file) counts in RSS. On a GPU those tensors are copied to the device, so the
    copy here makes the CPU figure comparable; ``malloc_trim`` returns the heap the 4-bit
    quantization left free.
    """
    import ctypes
    import gc

    import torch

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:  # type: ignore[attr-defined]
            if t.dtype != torch.uint8:  # 4-bit weights are fresh memory already
                t.data = t.data.clone()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(base_model: str, micro_batch: int, cutoff_len: int, gradient_checkpointing: bool = True,
            quantization: str | None = "nf4", lora_r: int = 16, steps: int = 1) -> dict:
    """Run ``steps`` training steps in this process and return measured and estimated peaks (bytes)."""
    import gc

    import bitsandbytes  # noqa: F401 - part of the baseline
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from alpaca_lora import FinetuneConfig, estimate_memory
    from alpaca_lora.kernels.cpu_linear4bit import use_onednn_4bit_layers
    from alpaca_lora.kernels.cpu_matmul import resolve_backend
    from alpaca_lora.kernels.cross_entropy import token_losses_sum
    from alpaca_lora.model.load import load_model
    from alpaca_lora.model.lora import attach_lora

    torch.manual_seed(0)
    gc.collect()
    baseline = _status("VmRSS")
    overrides = dict(micro_batch_size=micro_batch, batch_size=micro_batch, cutoff_len=cutoff_len, lora_r=lora_r,
                     lora_alpha=2 * lora_r, quantization=quantization, gradient_checkpointing=gradient_checkpointing,
                     compute_dtype="float32", device="cpu")
    cfg = FinetuneConfig(**overrides)
    model, _ = load_model(base_model, cfg.quantization, cfg.compute_dtype, device="cpu")
    model = attach_lora(model, cfg)
    onednn = resolve_backend(cfg.cpu_matmul, torch.device("cpu"), torch.float32) == "onednn"
    if onednn:  # the 4-bit layers' products go where finetune() sends them
        use_onednn_4bit_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for p in params:  # AdamW's state as after its first step, so one measured step sees all of it
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    _release_file_mapping(model)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    after_load = _status("VmRSS")
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (micro_batch, cutoff_len))
    mask = torch.ones_like(ids)
    model.train()
    for _ in range(steps):
        loss_sum, n = token_losses_sum(model, ids, mask, ids.clone(), chunk_size=cfg.loss_chunk_size,
                                       onednn=onednn)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _status("VmHWM")
    est = estimate_memory(base_model, **overrides)
    return {"base_model": Path(base_model).name, "micro_batch": micro_batch, "cutoff_len": cutoff_len,
            "gradient_checkpointing": gradient_checkpointing, "quantization": quantization,
            "baseline_mb": round(baseline / MB, 1), "model_loaded_mb": round((after_load - baseline) / MB, 1),
            "measured_mb": round((peak - baseline) / MB, 1), "estimated_mb": round(est.total / MB, 1),
            "ratio": round(est.total / (peak - baseline), 3),
            "estimated_parts_mb": {k: round(v / MB, 1) for k, v in est.parts.items()}}


def measure_in_subprocess(base_model: str | Path, micro_batch: int, cutoff_len: int,
                          gradient_checkpointing: bool = True, timeout: float = 1800,
                          default_malloc: bool = False) -> dict:
    """Run :func:`measure` in a fresh interpreter (so earlier allocations do not count) and return its result."""
    cmd = [sys.executable, __file__, "--base-model", str(base_model), "--micro-batch", str(micro_batch),
           "--cutoff-len", str(cutoff_len)] + ([] if gradient_checkpointing else ["--no-gc"])
    env = {**os.environ, **({} if default_malloc else MALLOC_ENV)}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if run.returncode:
        raise RuntimeError(f"measurement failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def tiny_model(folder: Path) -> Path:
    """Write the test suite's tiny Llama (2 layers, hidden 64, SmolLM2 tokenizer and vocabulary)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alpaca_lora import default_base_model

    tok = AutoTokenizer.from_pretrained(default_base_model())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TINY_CONFIGS = [(1, 128, True), (4, 256, True), (8, 512, True), (4, 256, False)]
SMOL_CONFIGS = [(1, 256, True), (2, 256, True), (4, 256, True), (4, 256, False)]


def table() -> list[dict]:
    """Measure every configuration of docs/memory.md, each in a fresh interpreter."""
    from alpaca_lora import default_base_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_model(Path(tmp) / "tiny")
        for base, configs in ((tiny, TINY_CONFIGS), (default_base_model(), SMOL_CONFIGS)):
            for mb, t, gc in configs:
                row = measure_in_subprocess(base, mb, t, gc)
                row["base_model"] = "tiny" if base == tiny else "SmolLM2-135M"
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--no-gc", action="store_true", help="without gradient checkpointing")
    parser.add_argument("--table", action="store_true", help="measure the docs/memory.md configurations")
    args = parser.parse_args()
    if args.table:
        rows = table()
        print("| model | micro_batch x cutoff_len | grad. ckpt | measured MB | estimated MB | ratio |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['base_model']} | {r['micro_batch']} x {r['cutoff_len']} | "
                  f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['measured_mb']} | {r['estimated_mb']} | "
                  f"{r['ratio']} |")
        return
    if not args.base_model:
        parser.error("--base-model is required (or --table)")
    print(json.dumps(measure(args.base_model, args.micro_batch, args.cutoff_len, not args.no_gc)))


if __name__ == "__main__":
    main()
