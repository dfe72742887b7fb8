"""One benchmark configuration in one fresh process: the baseline recipe, TRL's SFTTrainer or alpaca_lora.

Run by ``bench_train.py``; prints nothing but progress and writes one JSON result. Both recipes
train the same random-init weights on the same tokenized records, in the same micro-batches and
order, with the same LoRA settings; what differs is the training code.

- ``baseline``: transformers ``Trainer`` + peft + bitsandbytes NF4 (double quant),
  ``prepare_model_for_kbit_training`` (gradient checkpointing on, its default),
  ``DataCollatorForSeq2Seq(pad_to_multiple_of=8)``: the recipe of tloen/alpaca-lora and the peft docs.
- ``trl``: TRL's ``SFTTrainer`` with its defaults (gradient checkpointing, NF4 base, ``peft_config``), padded,
  completion-only loss (the ``labels`` column masks the prompt), the same micro-batches in the same order.
- ``trl_packed``: the same with ``packing=True`` and its default best-fit-decreasing strategy (padding-free
  rows, document-aware positions): TRL's fastest configuration. Its micro-batches are TRL's packed rows of
  ``--cutoff`` tokens, so tokens per step differ from the other recipes; tokens/s counts real tokens.
- ``alpaca_lora``: ``alpaca_lora.train.recipe.setup / fit / save``, i.e. ``finetune()`` with its defaults,
  plus any ``--set field=value`` overrides (the ablations).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # our default "attention"


def rss_mb(field: str) -> float:
    """VmRSS or VmHWM (peak) of this process in MB, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_data(args: argparse.Namespace):
    """Tokenized records (the same for both recipes) and the micro-batch order of epoch 0."""
    from datasets import concatenate_datasets
    from transformers import AutoTokenizer

    from alpaca_lora import load_instructions
    from alpaca_lora.data.pipeline import prepare_dataset
    from alpaca_lora.data.sampler import epoch_batches

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if args.context_probe:
        records = long_records(tokenizer, args.cutoff, args.records)
    else:
        parts = [load_instructions(Path(args.data_dir) / name) for name in args.data_files.split(",")]
        records = concatenate_datasets(parts).shuffle(seed=0).select(range(args.records))
    tokenized, _ = prepare_dataset(records, tokenizer, template="alpaca", cutoff_len=args.cutoff)
    batches = epoch_batches(list(tokenized["length"]), args.micro_batch, 42, 0)
    return records, tokenized, tokenizer, batches


def long_records(tokenizer, length: int, count: int):
    """``count`` records whose answer runs past ``length`` tokens (truncated there), for the context probe."""
    from datasets import Dataset

    sentence = "The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill. "
    repeats = length // max(1, len(tokenizer(sentence)["input_ids"])) + 2
    record = {"instruction": "Copy the text.", "input": "", "output": sentence * repeats}
    return Dataset.from_list([record] * count)


def step_flops(args: argparse.Namespace, tokenized, batches: list[list[int]]) -> list[float]:
    """Model FLOPs of each micro-batch (``gpu_metrics.train_flops``): the same for both recipes."""
    from gpu_metrics import train_flops
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model_dir)
    flops = []
    for batch in batches:
        rows = [tokenized[i] for i in batch]
        labels = sum(sum(1 for y in r["labels"][1:] if y != -100) for r in rows)
        flops.append(train_flops(config, [len(r["input_ids"]) for r in rows], labels, 16, LORA_TARGETS))
    return flops


def tokens_of(tokenized, batches: list[list[int]]) -> list[int]:
    """Real (non-padding) tokens of each micro-batch."""
    return [sum(len(tokenized[i]["input_ids"]) for i in b) for b in batches]


def flops_stats(out: dict, args: argparse.Namespace, tokenized, batches: list[list[int]]) -> None:
    """Median achieved model TFLOP/s over the timed steps, and MFU on a GPU with a known peak.

    ``batches`` is the shared micro-batch order; a run that trained other micro-batches
    (``group_by_length``) gets no FLOP figures rather than wrong ones.
    """
    from gpu_metrics import peak_bf16_flops

    times, warmup = out["step_s"], out["warmup"]
    if out["step_tokens"] != tokens_of(tokenized, batches[: len(times)]):
        out.update(step_flops=None, model_tflops_per_s=None)
        return
    flops = step_flops(args, tokenized, batches[: len(times)])
    out["step_flops"] = flops
    rates = [f / t for f, t in zip(flops[warmup:], times[warmup:], strict=False)]
    out["model_tflops_per_s"] = statistics.median(rates) / 1e12 if rates else None
    if out["device"] == "cuda" and rates:
        peak = peak_bf16_flops(torch.cuda.get_device_name(0))
        out["peak_bf16_tflops"] = peak / 1e12 if peak else None
        out["mfu"] = statistics.median(rates) / peak if peak else None


def step_stats(times: list[float], tokens: list[int], warmup: int) -> dict:
    """Median tokens/s and step time over the steps after ``warmup``."""
    t, n = times[warmup:], tokens[warmup:]
    rates = [k / s for k, s in zip(n, t, strict=True)]
    return {"steps_timed": len(t), "median_tokens_per_s": statistics.median(rates),
            "median_step_s": statistics.median(t), "tokens_per_s_all": sum(n) / sum(t),
            "step_s": [round(x, 4) for x in times], "step_tokens": tokens}


def time_split(full, body, reps: int = 3) -> dict:
    """Median forward+backward time of the whole loss and of the model body alone (same batch)."""

    def once(fn) -> float:
        start = time.perf_counter()
        fn().backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # CUDA runs asynchronously: time the work, not its launch
        return time.perf_counter() - start

    once(body)  # warm-up of the body-only graph; training has warmed up the full one
    full_s = statistics.median(once(full) for _ in range(reps))
    body_s = statistics.median(once(body) for _ in range(reps))
    return {"fwd_bwd_s": full_s, "body_s": body_s, "head_loss_s": max(0.0, full_s - body_s)}


def dropout_eval(model) -> None:
    """Switch dropout off without model.eval() (bitsandbytes repacks 4-bit weights in eval on the CPU)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()


def dropout_train(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.train()


def compute_dtype(args: argparse.Namespace) -> torch.dtype:
    """The baseline's compute dtype: ``--compute-dtype``, or for "auto" bf16 on CUDA and fp32 on the CPU."""
    if args.compute_dtype == "auto":
        return torch.bfloat16 if args.device == "cuda" else torch.float32
    return getattr(torch, args.compute_dtype)


def load_nf4(args: argparse.Namespace, dtype: torch.dtype):
    """The references' base: ``--model-dir`` in bitsandbytes NF4 with double quantization, computing in ``dtype``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=quant, dtype=dtype,
                                                device_map={"": args.device})


def step_timer(args: argparse.Namespace, times: list[float]):
    """A ``TrainerCallback`` appending each optimizer step's seconds to ``times`` (synchronized on CUDA)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    return Timer()


def reference_probe(model, collator, train, args: argparse.Namespace, dtype: torch.dtype, out: dict) -> dict:
    """A reference recipe's loss on the probe batch (the first micro-batch, padded) before training, into ``out``.

    Dropout is off for the probe; the model stays in train mode (bitsandbytes would repack the 4-bit
    weights for inference in eval mode). Returns the probe batch on the device.
    """
    probe = {k: v.to(args.device) for k, v in collator([train[i] for i in range(args.micro_batch)]).items()}
    model.train()
    dropout_eval(model)
    with torch.no_grad():
        out["probe_loss"] = float(model(**probe).loss)
    dropout_train(model)
    out["probe_label_tokens"] = int((probe["labels"][:, 1:] != -100).sum())
    out["rss_loaded_mb"] = rss_mb("VmRSS")
    out["compute_dtype_resolved"] = str(dtype).removeprefix("torch.")
    return probe


def run_baseline(args: argparse.Namespace, out: dict) -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    _, tokenized, tokenizer, batches = load_data(args)
    order = [i for b in batches for i in b]
    train = tokenized.select(order).remove_columns(["length"])
    dtype = compute_dtype(args)
    model = load_nf4(args, dtype)
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    probe = reference_probe(model, collator, train, args, dtype, out)

    times: list[float] = []

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.micro_batch,
                                  gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=3e-4,
                                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
                                  bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                  train_sampling_strategy="sequential",
                                  dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collator,
                          callbacks=[step_timer(args, times)])
        trainer.train()
    out["peak_rss_mb"] = rss_mb("VmHWM")
    tokens = tokens_of(tokenized, batches[: len(times)])
    out.update(step_stats(times, tokens, args.warmup))
    flops_stats(out, args, tokenized, batches)
    out["final_loss"] = next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r), None)
    body = model.get_base_model().model
    if args.split:
        out["split"] = time_split(lambda: model(**probe).loss,
                                  lambda: body(input_ids=probe["input_ids"],
                                               attention_mask=probe["attention_mask"]).last_hidden_state.float().mean())


def run_trl(args: argparse.Namespace, out: dict) -> None:
    """TRL ``SFTTrainer`` (``--recipe trl`` padded, ``trl_packed`` with BFD packing) on the same tokenized records.

    The records go in tokenized (``input_ids`` and ``labels``, prompt masked with -100, truncated at
    ``--cutoff``): TRL keeps a given ``labels`` column, so its loss covers the same tokens as ours.
    """
    from peft import LoraConfig
    from transformers import DataCollatorForSeq2Seq
    from trl import SFTConfig, SFTTrainer

    packed = args.recipe == "trl_packed"
    _, tokenized, tokenizer, batches = load_data(args)
    order = [i for b in batches for i in b]
    train = tokenized.select(order).select_columns(["input_ids", "labels"])
    dtype = compute_dtype(args)
    model = load_nf4(args, dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    times: list[float] = []
    counts: list[int] = []

    class CountingSFTTrainer(SFTTrainer):
        """Records the real tokens of each micro-batch it trains (padding-free rows have no padding)."""

        def training_step(self, model, inputs, *rest, **kw):
            mask = inputs.get("attention_mask")
            counts.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *rest, **kw)

    with tempfile.TemporaryDirectory() as tmp:
        targs = SFTConfig(output_dir=tmp, per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=1,
                          max_steps=args.steps, learning_rate=3e-4, logging_steps=1, save_strategy="no", report_to=[],
                          use_cpu=args.device == "cpu", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                          train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
                          max_length=args.cutoff, packing=packed, completion_only_loss=True)
        trainer = CountingSFTTrainer(model=model, args=targs, train_dataset=train, processing_class=tokenizer,
                                     peft_config=lora, callbacks=[step_timer(args, times)])
        model = trainer.model
        # The probe: the first micro-batch of the shared order, padded as the baseline pads it, before training.
        collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
        reference_probe(model, collator, train, args, dtype, out)
        trainer.train()
    out["peak_rss_mb"] = rss_mb("VmHWM")
    out["config"] = {"packing": packed, "packing_strategy": targs.packing_strategy if packed else None,
                     "gradient_checkpointing": targs.gradient_checkpointing, "loss_type": targs.loss_type,
                     "trl": __import__("trl").__version__}
    out.update(step_stats(times, counts[: len(times)], args.warmup))
    flops_stats(out, args, tokenized, batches)
    out["final_loss"] = next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r), None)


def run_ours(args: argparse.Namespace, out: dict) -> None:
    from alpaca_lora import FinetuneConfig
    from alpaca_lora.data.packing import body_kwargs
    from alpaca_lora.kernels.cross_entropy import causal_lm, token_losses_sum
    from alpaca_lora.train.recipe import fit, micro_batch_loss, save
    from alpaca_lora.train.setup import setup

    records, tokenized, _, batches = load_data(args)
    # finetune()'s default ("auto": bf16 on a CPU with native bf16 products, else fp32), or --compute-dtype.
    overrides = {"compute_dtype": args.compute_dtype}
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    cfg = FinetuneConfig(max_steps=args.steps, micro_batch_size=args.micro_batch, batch_size=args.micro_batch,
                         cutoff_len=args.cutoff, val_set_size=0, save_steps=10**9, logging_steps=1,
                         device=args.device, **overrides)
    out["config"] = {k: v for k, v in cfg.to_dict().items() if k in overrides}
    with tempfile.TemporaryDirectory() as tmp:
        run = setup(args.model_dir, records, Path(tmp), cfg)
        out["compute_dtype_resolved"] = str(run.dtype).removeprefix("torch.")
        probe_batch = run.collator([run.train_set[i] for i in batches[0]])
        dropout_eval(run.model)
        with torch.no_grad():
            s, n = micro_batch_loss(run, probe_batch)
        dropout_train(run.model)
        out["probe_loss"], out["probe_label_tokens"] = float(s) / n, n
        out["rss_loaded_mb"] = rss_mb("VmRSS")
        fit(run)
        out["peak_rss_mb"] = rss_mb("VmHWM")
        rows = [r for r in run.metrics.records if "loss" in r]
        elapsed = [0.0] + [r["elapsed_s"] for r in rows]
        seen = [0] + [r["tokens_seen"] for r in rows]
        times = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
        tokens = [b - a for a, b in zip(seen, seen[1:], strict=False)]
        out.update(step_stats(times, tokens, args.warmup))
        flops_stats(out, args, tokenized, batches)
        out["final_loss"] = rows[-1]["loss"]
        b = {k: v.to(run.device) for k, v in probe_batch.items()}
        extra = body_kwargs(b)  # positions and record boundaries of a packed batch (it has no attention mask)
        body = causal_lm(run.model).get_decoder()
        if args.split:
            out["split"] = time_split(
                lambda: token_losses_sum(run.model, b["input_ids"], b.get("attention_mask"), b["labels"],
                                         chunk_size=cfg.loss_chunk_size, **extra)[0],
                lambda: body(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"),
                             **extra).last_hidden_state.float().mean())
        save(run)
        run.metrics.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipe", choices=["baseline", "trl", "trl_packed", "alpaca_lora"], required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--data-files", default="gsm8k_train_alpaca.json,gpteacher_roleplay_alpaca.json,"
                                           "gpteacher_toolformer_alpaca.json")
    p.add_argument("--cutoff", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="the compute dtype (auto: the references bf16 on CUDA and fp32 on a CPU; alpaca_lora "
                        "finetune()'s default)")
    p.add_argument("--set", action="append", default=[], help="FinetuneConfig override field=value (alpaca_lora)")
    p.add_argument("--no-split", dest="split", action="store_false",
                   help="skip timing the body / lm_head + loss split (saves a few forward+backward passes)")
    p.add_argument("--context-probe", action="store_true",
                   help="train on records of exactly --cutoff tokens and report whether the step fits")
    p.add_argument("--vram-cap-gb", type=float, default=None,
                   help="CUDA: cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = {"recipe": args.recipe, "compute_dtype": args.compute_dtype, "cutoff": args.cutoff,
           "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup, "device": args.device,
           "torch_threads": torch.get_num_threads(), "rss_start_mb": rss_mb("VmRSS")}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        if args.vram_cap_gb:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_cap_gb * 1e9 / total))
            out["vram_cap_gb"] = args.vram_cap_gb
    start = time.perf_counter()
    try:
        recipes = {"baseline": run_baseline, "trl": run_trl, "trl_packed": run_trl, "alpaca_lora": run_ours}
        recipes[args.recipe](args, out)
        out["fits"] = True
    except torch.OutOfMemoryError as exc:
        if not args.context_probe:
            raise
        out.update(fits=False, error=str(exc).splitlines()[0])
    out["wall_s"] = time.perf_counter() - start
    if args.device == "cuda":
        out["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(args.out).write_text(json.dumps(out, indent=1))
    os._exit(0)  # skip slow interpreter teardown of large models


if __name__ == "__main__":
    main()
