"""FinetuneConfig: every setting of a run, typed, documented and validated in one place.

Names follow tloen/alpaca-lora where one exists (``batch_size``, ``micro_batch_size``,
``num_epochs``, ``cutoff_len``, ``lora_r`` ...) so its users can switch without a lookup table.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alpaca_lora.errors import ConfigError

QUANTIZATIONS = ("nf4", "fp4", "int8", None)
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_MATMULS = ("auto", "onednn", "blas")
CPU_CHUNK_BYTES = 30 * 1024 * 1024
"""On the CPU, a chunk's fp32 logits stay below glibc's largest heap-served allocation (32 MB).

Larger buffers get a fresh memory mapping each time, and every one of its pages faults in again:
on the SmolLM2-135M shape (49,152-token vocabulary), 311 label rows in one 61 MB chunk cost about
15,000 page faults a micro-batch. Capped at 160 rows, the buffer is reused from the heap.
"""


def cpu_chunk_rows(chunk_size: int, vocab: int) -> int:
    """``chunk_size`` label rows, fewer if their fp32 logits would pass ``CPU_CHUNK_BYTES`` (CPU runs)."""
    return min(chunk_size, max(1, CPU_CHUNK_BYTES // (4 * vocab)))

SCHEDULERS = ("linear", "cosine", "constant")
REPORTERS = ("none", "tensorboard", "wandb")


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run. Every field can be passed to ``finetune(**overrides)``."""

    batch_size: int = 32
    """Examples per optimizer step (the global batch); must be a multiple of ``micro_batch_size``."""
    micro_batch_size: int = 4
    """Examples per forward/backward pass; gradient accumulation = batch_size // micro_batch_size."""
    num_epochs: float = 3.0
    """Passes over the training split (ignored when ``max_steps`` is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, overriding ``num_epochs``."""
    learning_rate: float = 3e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent on linear warm-up."""
    lr_scheduler: str = "linear"
    """Learning-rate schedule after warm-up: "linear", "cosine" or "constant"."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    cutoff_len: int = 512
    """Longest tokenized example; longer ones keep their prompt, lose the end of the response, keep EOS."""
    val_set_size: float = 0.05
    """Validation split: a count (>= 1) or a fraction (< 1) of the data; 0 disables evaluation."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: str | list[str] = "attention"
    """Modules that get adapters: "attention" (q,k,v,o projections), "all-linear", or a list of names."""
    fused_lora: bool = True
    """Compute each LoRA update in one autograd node with a 16-bit dropout mask (same function as peft's
    layers, cheaper on CPUs); False keeps peft's layers."""
    train_on_inputs: bool = False
    """Also train on the prompt tokens (by default only the response and EOS carry loss)."""
    add_eos_token: bool = True
    """Append EOS to every example so the model learns to stop."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding, slightly less random batches)."""
    packing: bool = True
    """Put each micro-batch's examples end to end in one row, with no attention across them: no padding is
    computed and the loss is the same as padded batches (needs the sdpa or eager attention)."""
    template: str | dict[str, Any] = "alpaca"
    """Prompt template: a built-in name, a JSON file path or a dict."""
    quantization: str | None = "nf4"
    """Base weight format: "nf4" (QLoRA, double quantization), "fp4", "int8" or None (full precision)."""
    compute_dtype: str = "auto"
    """Compute dtype: "auto" (bf16 on CUDA with bf16, fp16 on older CUDA; on a CPU bf16 with AMX or AVX-512 BF16,
    else fp32), "float32", "bfloat16" or "float16"."""
    loss_scaling: bool = True
    """Dynamic loss scaling when the compute dtype is float16, so small gradients do not flush to zero
    (steps whose scaled gradients overflow are skipped and the scale halves); no effect in bf16 or fp32."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less memory, about 30% more compute."""
    seed: int = 42
    """Seed for the split, shuffling, LoRA initialisation and dropout."""
    logging_steps: int = 1
    """Log the training loss every this many optimizer steps."""
    eval_steps: int | None = None
    """Evaluate every this many optimizer steps; None evaluates at the end of each epoch."""
    save_steps: int | None = None
    """Write a checkpoint every this many optimizer steps; None writes one at the end of each epoch."""
    save_total_limit: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    resume_from_checkpoint: bool | str | None = None
    """True resumes from the newest checkpoint in the output folder; a path resumes from that one."""
    report_to: str | list[str] = "none"
    """Extra loggers: "none", "tensorboard", "wandb" or a list of them (metrics.jsonl is always written)."""
    skip_bad_records: bool = False
    """Skip malformed data records (and report them) instead of failing on the first one."""
    column_map: dict[str, str] | None = None
    """Map your column names to instruction/input/output, e.g. {"question": "instruction"}."""
    release_cpu_memory: bool = False
    """On a Linux CPU, return freed activation memory to the OS at once (glibc mmap threshold 256 KiB).
    Steps run about 2x slower (page faults); it lowers the peak only when a long training step, not
    loading, sets it (no gain in the 135M benchmark). Process-wide; CPU only."""
    cpu_matmul: str = "auto"
    """fp32 matrix products of the 4-bit layers and the lm_head when training on a CPU: "onednn",
    "blas" (torch's default, MKL in the x86 wheels) or "auto" (oneDNN where it is measured faster on
    this CPU, once per process). Same fp32 arithmetic either way; see ``alpaca_lora.cpu_matmul``."""
    loss_chunk_size: int = 1024
    """Label positions per lm_head + cross-entropy chunk; bounds the logits held in memory. On the CPU a
    chunk also holds at most 30 MiB of logits (160 rows for a 49k vocabulary; see ``CPU_CHUNK_BYTES``)."""
    device: str = "auto"
    """Where to train: "auto" (CUDA if present, else CPU), "cpu", "cuda" or "cuda:N" (under torchrun
    or accelerate launch, "auto" and "cuda" mean the GPU of the process's LOCAL_RANK)."""
    fsdp: bool = False
    """Shard the base model over the processes with FSDP (torchrun/accelerate launch) instead of copying it
    to each; 4-bit weights are then stored in the compute dtype (``bnb_4bit_quant_storage``) so FSDP can
    shard them. ``accelerate launch`` with an FSDP config turns this on by itself."""
    ddp_timeout: int = 1800
    """Seconds a process waits in a collective for a missing peer before the run fails (multi-process runs)."""

    def __post_init__(self) -> None:
        if isinstance(self.resume_from_checkpoint, os.PathLike):  # a Path is as good as its text
            self.resume_from_checkpoint = os.fspath(self.resume_from_checkpoint)
        problems = self.problems()
        if problems:
            raise ConfigError("invalid FinetuneConfig:\n  - " + "\n  - ".join(problems))

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.batch_size // self.micro_batch_size

    def problems(self) -> list[str]:
        """Return every invalid field as a message naming the field, value, allowed values and fix."""
        p: list[str] = []

        def positive(name: str, kind: type = int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (kind, int)) or value <= 0:
                p.append(f"{name}={value!r}: must be a positive {kind.__name__}")

        for name in ("batch_size", "micro_batch_size", "cutoff_len", "lora_r", "logging_steps",
                     "loss_chunk_size", "ddp_timeout"):
            positive(name)
        positive("learning_rate", float)
        positive("num_epochs", float)
        for name in ("max_steps", "eval_steps", "save_steps"):
            if getattr(self, name) is not None:
                positive(name)
        if not p and self.batch_size % self.micro_batch_size:
            fixed = self.batch_size // self.micro_batch_size * self.micro_batch_size or self.micro_batch_size
            p.append(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}; "
                f"use batch_size={fixed}"
            )
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            p.append(f"lora_alpha={self.lora_alpha!r}: must be a positive number (commonly 2 * lora_r)")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            p.append(f"lora_dropout={self.lora_dropout!r}: must be in [0, 1)")
        if not isinstance(self.warmup_ratio, (int, float)) or not 0 <= self.warmup_ratio < 1:
            p.append(f"warmup_ratio={self.warmup_ratio!r}: must be in [0, 1)")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            p.append(f"weight_decay={self.weight_decay!r}: must be >= 0")
        if not isinstance(self.max_grad_norm, (int, float)) or self.max_grad_norm < 0:
            p.append(f"max_grad_norm={self.max_grad_norm!r}: must be >= 0 (0 disables clipping)")
        v = self.val_set_size
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            p.append(f"val_set_size={v!r}: must be a count >= 1, a fraction in (0, 1), or 0 for no evaluation")
        elif isinstance(v, float) and v >= 1 and v != int(v):
            p.append(f"val_set_size={v!r}: a value >= 1 is a record count and must be whole")
        if self.quantization not in QUANTIZATIONS:
            p.append(_choice("quantization", self.quantization, QUANTIZATIONS))
        if self.compute_dtype not in COMPUTE_DTYPES:
            p.append(_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES))
        if self.cpu_matmul not in CPU_MATMULS:
            p.append(_choice("cpu_matmul", self.cpu_matmul, CPU_MATMULS))
        if self.lr_scheduler not in SCHEDULERS:
            p.append(_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS))
        if self.report_to is None:
            self.report_to = "none"  # transformers users pass None for "no reporter"
        reporters = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        if not isinstance(reporters, (list, tuple)):
            p.append(f"report_to={self.report_to!r}: must be a name or a list of names from {list(REPORTERS)}")
            reporters = []
        for r in reporters:
            if r not in REPORTERS:
                p.append(_choice("report_to", r, REPORTERS))
        if isinstance(self.lora_target_modules, tuple):
            self.lora_target_modules = list(self.lora_target_modules)
        t = self.lora_target_modules
        if isinstance(t, str):
            if not t:
                p.append('lora_target_modules="": give "attention", "all-linear" or a list of module names')
        elif not (isinstance(t, (list, tuple)) and t and all(isinstance(x, str) and x for x in t)):
            p.append(f"lora_target_modules={t!r}: must be a non-empty list of module names or a string")
        if not isinstance(self.save_total_limit, int) or self.save_total_limit < 1:
            p.append(f"save_total_limit={self.save_total_limit!r}: must be >= 1 (the last checkpoint is kept)")
        if self.resume_from_checkpoint is not None and not isinstance(self.resume_from_checkpoint, (bool, str)):
            p.append(f"resume_from_checkpoint={self.resume_from_checkpoint!r}: must be True, False or a path")
        if self.column_map is not None and not (
            isinstance(self.column_map, dict)
            and all(v in ("instruction", "input", "output") for v in self.column_map.values())
        ):
            p.append(f"column_map={self.column_map!r}: must map your column names to instruction/input/output")
        if self.fsdp and self.quantization == "int8":
            p.append("fsdp=True with quantization='int8': FSDP shards 4-bit bases ('nf4', 'fp4') or full-precision "
                     "ones (None); use quantization='nf4'")
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            p.append(f"device={self.device!r}: must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return p

    # ---- io ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the config as JSON (``.json``) or YAML (``.yaml``/``.yml``) and return the path."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "dict") -> FinetuneConfig:
        """Build a config from a dict; an unknown key is a ConfigError listing close matches."""
        check_field_names(data, source)
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> FinetuneConfig:
        """Load a config from a JSON or YAML file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                data = _yaml_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml and json raise different types
            raise ConfigError(f"config file {path} does not parse: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of field names to values")
        return cls.from_dict(data, source=str(path))

    def replace(self, **overrides: Any) -> FinetuneConfig:
        """Return a copy with ``overrides`` applied (validated, unknown names rejected)."""
        check_field_names(overrides, "overrides")
        return dataclasses.replace(self, **overrides)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 reads an exponent without a dot as text)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def field_names() -> list[str]:
    """Return the names of all FinetuneConfig fields."""
    return [f.name for f in dataclasses.fields(FinetuneConfig)]


def check_field_names(data: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming every key of ``data`` that is not a FinetuneConfig field."""
    names = field_names()
    bad = []
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
            bad.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if bad:
        raise ConfigError(
            f"unknown FinetuneConfig field(s) in {source}: {'; '.join(bad)}. "
            "See help(alpaca_lora.FinetuneConfig) for every field."
        )


def _choice(name: str, value: Any, allowed: tuple) -> str:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed if a is not None], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{name}={value!r}: must be one of {list(allowed)}{hint}"

