"""FinetuneConfig: every setting of a run, typed, documented and validated in one place.

Names follow tloen/alpaca-lora where one exists (``batch_size``, ``micro_batch_size``,
``num_epochs``, ``cutoff_len``, ``lora_r`` ...) so its users can switch without a lookup table.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alpaca_lora.config_checks import (
    FLOAT32_MAX,
    INT_MAX,
    MAX_EPOCHS,
    MAX_LORA_R,
    SEED_MAX,
    bool_problem,
    check_names,
    choice_problem,
    int_problem,
    is_choice,
    is_finite,
    keyword_checked,
    number_fix,
    number_problem,
)
from alpaca_lora.config_file import read_config_file
from alpaca_lora.config_lora import lora_variant_problems, new_token_problems
from alpaca_lora.data.prompts import PromptTemplate, get_template
from alpaca_lora.errors import ConfigError, shown

QUANTIZATIONS = ("nf4", "fp4", "int8", None)
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_MATMULS = ("auto", "onednn", "blas")
DATA_FORMATS = ("auto", "alpaca", "messages", "sharegpt")
SCHEDULERS = ("linear", "cosine", "constant")
REPORTERS = ("none", "tensorboard", "wandb")


@keyword_checked
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
    """LoRA rank (1 to 65,536)."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: str | list[str] = "attention"
    """Modules that get adapters: "attention" (q,k,v,o projections), "all-linear", or a list of names."""
    fused_lora: bool = True
    """Compute each LoRA update in one autograd node with a 16-bit dropout mask (same function as peft's
    layers, cheaper on CPUs); False keeps peft's layers. DoRA layers always run peft's forward."""
    use_rslora: bool = False
    """rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): scale the update by lora_alpha / sqrt(lora_r) instead of
    lora_alpha / lora_r, so that high ranks (64 and up) keep learning as fast as low ones."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024, arXiv:2402.09353): a trained magnitude per output row beside LoRA's low-rank
    direction update; closer to full fine-tuning at low ranks. Steps are slower: each forward takes the
    norm of every adapted weight (dequantized first on a 4-bit base)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): the B matrices learn this many times faster than the A
    matrices (a second optimizer parameter group); the paper's choice is 16. None: one learning rate."""
    init_lora_weights: str = "default"
    """How the adapters start. "default": A Kaiming-uniform, B zero, so the model starts as the base.
    "gaussian": A normal with std 1/r. "pissa" (Meng et al. 2024, arXiv:2404.02948), or "pissa_niter_N" for
    a fast randomized SVD with N iterations: A and B from each weight's top-r singular vectors, the base
    keeping the residual. "olora" (Büyükakyüz 2024, arXiv:2406.01775): the same with a QR decomposition.
    "loftq" (Li et al. 2023, arXiv:2310.08659; quantization="nf4" only): A and B from the SVD of the
    quantization error, so the 4-bit base plus the adapter starts closer to the full-precision model.
    PiSSA and OLoRA on a 4-bit base quantize the residual again; their saved adapter is converted to a
    plain LoRA of rank 2r on the original base, so merge, generate and export read it as any other."""
    add_tokens: list[str] | None = None
    """New tokens for the vocabulary (a domain's words or markers), which the tokenizer then keeps whole.
    Their embedding rows (and untied lm_head rows) start at the mean of the existing rows, as Stanford
    Alpaca's resize did, and train beside LoRA as those rows only (peft's trainable_token_indices). Tokens
    the vocabulary already holds are skipped and reported. See docs/lora_variants.md, "New tokens"."""
    special_tokens: list[str] | None = None
    """New special tokens (a chat format's markers, e.g. "<|tool|>"): as ``add_tokens``, and marked special,
    so decoding with ``skip_special_tokens`` drops them."""
    new_token_training: str = "rows"
    """How new tokens train: "rows" (only their embedding rows, which the adapter holds) or "full" (the whole
    embedding and lm_head beside LoRA, peft's modules_to_save: for many new tokens; the adapter holds both)."""
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
    """Prompt template of Alpaca records: a built-in name, a JSON file path or a dict."""
    data_format: str = "auto"
    """Data format: "auto" (conversations where records hold `messages` or `conversations`, else Alpaca
    records), "alpaca", "messages" (OpenAI role/content) or "sharegpt" (from/value)."""
    chat_template: str | None = None
    """Chat template of conversations: None for the base tokenizer's own, a built-in name ("chatml", "llama3",
    or an Alpaca template name), a Jinja string or a .jinja file. It is saved as the output's chat template."""
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
    """Seed for the split, shuffling, LoRA initialisation and dropout (0 to 2**32 - 1)."""
    logging_steps: int = 1
    """Log the training loss every this many optimizer steps."""
    eval_steps: int | None = None
    """Evaluate every this many optimizer steps; None evaluates at the end of each epoch."""
    eval_generate_samples: int = 0
    """At each evaluation, also answer this many validation records greedily (the same ones each time) and log
    exact match, BLEU, ROUGE-L and chrF (``eval_exact_match``, ...); 0 (default) logs the eval loss only."""
    eval_generate_max_new_tokens: int = 64
    """Most tokens per answer of ``eval_generate_samples``."""
    save_steps: int | None = None
    """Write a checkpoint every this many optimizer steps; None writes one at the end of each epoch."""
    save_total_limit: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    resume_from_checkpoint: bool | str | None = None
    """True resumes from the newest checkpoint in the output folder; a path resumes from that one."""
    report_to: str | list[str] = "none"
    """Extra loggers: "none", "tensorboard", "wandb" or a list of them (metrics.jsonl is always written)."""
    data_cache_dir: str | None = "auto"
    """Where tokenized data is kept and reused by later runs, resumes and the other processes of a run: "auto"
    (the datasets cache, `HF_DATASETS_CACHE/alpaca_lora`), a folder, or None to tokenize every run without a cache."""
    data_num_proc: int | None = None
    """Processes that tokenize the data; None: one per core for 20,000 records or more, else one."""
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
    this CPU, once per process). Same fp32 arithmetic either way; see ``alpaca_lora.kernels.cpu_matmul``."""
    loss_chunk_size: int = 1024
    """Label positions per lm_head + cross-entropy chunk; bounds the logits held in memory. On the CPU a
    chunk also holds at most 30 MiB of logits (160 rows for a 49k vocabulary; see
    ``alpaca_lora.kernels.cross_entropy.CPU_CHUNK_BYTES``)."""
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
        self._normalize()
        problems = self.problems()
        if problems:
            raise ConfigError("invalid FinetuneConfig:\n  - " + "\n  - ".join(problems))

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.batch_size // self.micro_batch_size

    def _normalize(self) -> None:
        """Equivalent spellings to the documented types: a Path to its text, numpy numbers to Python ones."""
        for name in ("resume_from_checkpoint", "template", "chat_template", "data_cache_dir"):
            if isinstance(getattr(self, name), os.PathLike):  # a Path is as good as its text
                setattr(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.template, PromptTemplate):
            self.template = self.template.to_dict()
        if self.report_to is None:
            self.report_to = "none"  # transformers users pass None for "no reporter"
        for name in ("lora_target_modules", "report_to", "add_tokens", "special_tokens"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        for name in (*_INTS, *_FLOATS, "val_set_size", "loraplus_lr_ratio"):
            value = getattr(self, name)
            if isinstance(value, (bool, int, float)):
                continue
            if isinstance(value, numbers.Integral):  # numpy.int64 from a sweep
                setattr(self, name, int(value))
            elif isinstance(value, numbers.Real):
                setattr(self, name, float(value))

    def problems(self) -> list[str]:
        """Return every invalid field as a message naming the field, value, allowed values and fix."""
        p: list[str] = []
        for name, (low, high) in _INTS.items():
            p.append(int_problem(name, getattr(self, name), low, high, optional=name in _OPTIONAL,
                                 example=_DEFAULTS[name]))
        for name, (ok, allowed) in _FLOATS.items():
            p.append(number_problem(name, getattr(self, name), ok, allowed, example=_DEFAULTS[name]))
        for name in _BOOLS:
            p.append(bool_problem(name, getattr(self, name)))
        for name, choices in _CHOICES.items():
            if not is_choice(getattr(self, name), choices):
                p.append(choice_problem(name, getattr(self, name), choices))
        p.append(_val_set_size_problem(self.val_set_size))
        p.extend(self._structured_problems())
        p = [x for x in p if x]
        if not p and self.batch_size % self.micro_batch_size:
            fixed = self.batch_size // self.micro_batch_size * self.micro_batch_size or self.micro_batch_size
            p.append(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}; "
                f"use batch_size={fixed}"
            )
        if isinstance(self.eval_generate_samples, int) and self.eval_generate_samples > 0:
            if self.train_on_inputs is True:
                p.append(f"eval_generate_samples={self.eval_generate_samples} with train_on_inputs=True: the prompt of "
                         "a record trained whole cannot be told from its answer; set train_on_inputs=False or "
                         "eval_generate_samples=0")
            if self.val_set_size == 0:
                p.append(f"eval_generate_samples={self.eval_generate_samples} with val_set_size=0: there is no "
                         "validation split to answer; set val_set_size (e.g. 0.05) or eval_generate_samples=0")
        p.extend(lora_variant_problems(self))
        p.extend(new_token_problems(self))
        if self.fsdp is True and is_choice(self.quantization, ("int8",)):
            p.append("fsdp=True with quantization='int8': FSDP shards 4-bit bases ('nf4', 'fp4') or full-precision "
                     "ones (None); use quantization='nf4'")
        return p

    def _structured_problems(self) -> list[str]:
        """Problems of the fields that take text, lists or dicts."""
        p: list[str] = []
        reporters = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        if not isinstance(reporters, list):
            p.append(f"report_to={shown(self.report_to)}: must be a name or a list of names from {list(REPORTERS)}")
        else:
            bad = [r for r in reporters if not is_choice(r, REPORTERS)]
            if bad:
                p.append(choice_problem("report_to", bad[0], REPORTERS))
        t = self.lora_target_modules
        if isinstance(t, str):
            if not t.strip():
                p.append(f'lora_target_modules={shown(t)}: give "attention", "all-linear" or a list of module names')
        elif not (isinstance(t, list) and t and all(isinstance(x, str) and x.strip() for x in t)):
            p.append(f"lora_target_modules={shown(t)}: must be a non-empty list of module names (e.g. "
                     "['q_proj', 'v_proj']), \"attention\" or \"all-linear\"")
        p.append(_template_problem(self.template))
        d = self.data_cache_dir
        if d is not None and not (isinstance(d, str) and d.strip()):
            p.append(f"data_cache_dir={shown(d)}: must be 'auto' (the datasets cache), a folder path, or None (no "
                     "cache)")
        c = self.chat_template
        if c is not None and not (isinstance(c, str) and c.strip()):
            p.append(f"chat_template={shown(c)}: must be None (the tokenizer's own), a built-in name such as "
                     "'chatml' or 'alpaca', a Jinja string or a .jinja file path")
        r = self.resume_from_checkpoint
        if not (r is None or isinstance(r, bool) or (isinstance(r, str) and r.strip())):
            p.append(f"resume_from_checkpoint={shown(r)}: must be True (the newest checkpoint in output_dir), "
                     "False, None or the path of a checkpoint-N folder")
        m = self.column_map
        if m is not None and not (
            isinstance(m, dict) and all(isinstance(k, str) and k and v in RECORD_FIELDS for k, v in m.items())
        ):
            p.append(f"column_map={shown(m)}: must map your column names to instruction/input/output, "
                     "e.g. {'question': 'instruction', 'answer': 'output'}")
        elif m is not None and len(set(m.values())) != len(m):
            p.append(f"column_map={shown(m)}: maps two columns to one field; it must map each field once")
        d = self.device
        if not (isinstance(d, str) and (d in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d{1,4}", d))):
            p.append(f"device={shown(d)}: must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N the GPU number, e.g. 'cuda:0')")
        return [x for x in p if x]

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
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must be a mapping of FinetuneConfig field names to values, got "
                              f"{type(data).__name__} {shown(data, 60)}")
        check_field_names(data, source)
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> FinetuneConfig:
        """Load a config from a JSON or YAML file.

        See :func:`~alpaca_lora.config_file.read_config_file` for what is refused.
        """
        return cls.from_dict(read_config_file(path), source=str(path))

    def replace(self, **overrides: Any) -> FinetuneConfig:
        """Return a copy with ``overrides`` applied (validated, unknown names rejected)."""
        check_field_names(overrides, "overrides")
        return dataclasses.replace(self, **overrides)


RECORD_FIELDS = ("instruction", "input", "output")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
_INTS = {
    "batch_size": (1, INT_MAX), "micro_batch_size": (1, INT_MAX), "max_steps": (1, INT_MAX),
    "cutoff_len": (1, INT_MAX), "lora_r": (1, MAX_LORA_R), "lora_alpha": (1, INT_MAX), "seed": (0, SEED_MAX),
    "logging_steps": (1, INT_MAX), "eval_steps": (1, INT_MAX), "save_steps": (1, INT_MAX),
    "save_total_limit": (1, INT_MAX), "loss_chunk_size": (1, INT_MAX), "ddp_timeout": (1, INT_MAX),
    "data_num_proc": (1, 256), "eval_generate_samples": (0, INT_MAX), "eval_generate_max_new_tokens": (1, 4096),
}
"""Int fields and their inclusive ranges."""
_OPTIONAL = ("max_steps", "eval_steps", "save_steps", "data_num_proc")
"""Int fields that may also be None."""
_FLOATS: dict[str, tuple[Callable[[float], bool], str]] = {
    "num_epochs": (lambda v: 0 < v <= MAX_EPOCHS, f"in (0, {MAX_EPOCHS}]"),
    "learning_rate": (lambda v: 0 < v <= FLOAT32_MAX, f"> 0 and <= {FLOAT32_MAX:.4g} (AdamW holds it as a float32)"),
    "weight_decay": (lambda v: 0 <= v <= FLOAT32_MAX, f">= 0 and <= {FLOAT32_MAX:.4g} (AdamW holds it as a float32)"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}
"""Float fields (an int is a float too), with their allowed range and how it reads."""
_BOOLS = tuple(name for name, default in _DEFAULTS.items() if isinstance(default, bool))
_CHOICES = {"lr_scheduler": SCHEDULERS, "quantization": QUANTIZATIONS, "compute_dtype": COMPUTE_DTYPES,
            "cpu_matmul": CPU_MATMULS, "data_format": DATA_FORMATS}


def _val_set_size_problem(v: Any) -> str:
    allowed = f"0 (no evaluation), a fraction in (0, 1) or a whole record count in [1, {INT_MAX}]"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not is_finite(v) or v < 0:
        return f"val_set_size={shown(v)}: must be {allowed}{number_fix('val_set_size', v, 0.05)}"
    if v >= 1 and (v > INT_MAX or v != int(v)):
        return f"val_set_size={shown(v)}: a value >= 1 is a record count, so it must be whole and at most {INT_MAX}"
    return ""


def _template_problem(t: Any) -> str:
    names = "a built-in name (see alpaca_lora.list_templates()), a JSON file path or a dict of template fields"
    if isinstance(t, str):
        return "" if t.strip() else f"template={shown(t)}: give {names}"
    if isinstance(t, dict):
        try:
            get_template(t)
        except ConfigError as exc:
            return f"template={shown(t)}: {exc}"
        return ""
    return f"template={shown(t)}: must be {names} (got {type(t).__name__})"


def field_names() -> list[str]:
    """Return the names of all FinetuneConfig fields."""
    return [f.name for f in dataclasses.fields(FinetuneConfig)]


def check_field_names(data: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming every key of ``data`` that is not a FinetuneConfig field."""
    check_names(data, field_names(), source, "FinetuneConfig")
