"""merge(): fold a LoRA adapter into full-precision base weights, verify, export; push_to_hub().

The merge streams the base checkpoint tensor by tensor: each weight is read in fp32, the update
``scale * B @ A`` is added where the adapter has one, and the result is cast to the export dtype
and appended to a safetensors shard on disk. Memory holds one tensor at a time, never the model.

Verification streams too: a model skeleton with its parameters on the meta device runs a probe
batch, each module's weights loaded just before it runs and dropped after. Three passes (plain
base, merged fp32 weights, base + the unmerged adapter applied by peft's own LoRA layers) give
the logits that must agree (merged vs unmerged, as in peft's merge tests) and must differ (adapter
vs base). Merging SmolLM2-135M to fp16 with verification peaks about 315 MB above an interpreter
with torch, transformers and peft loaded, 90 MB of it importing alpaca_lora itself: 1.2x the
270 MB it writes (tests/test_merge.py measures it).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alpaca_lora import files
from alpaca_lora.data.prompts import PromptTemplate, get_template
from alpaca_lora.errors import ConfigError, ModelError, shown
from alpaca_lora.export import layout as art
from alpaca_lora.export.streamed import (
    SafetensorsWriter,
    read_tensor,
    release_free_memory,
    skeleton,
    streamed_logits,
    tensor_metas,
)
from alpaca_lora.model import adapter_files

logger = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MERGE_TARGETS = ("original", "dequantized")
MERGE_REPORT = "merge_report.json"
INDEX_FILE = "model.safetensors.index.json"
# Merged and unmerged fp32 logits may differ by rounding: 1e-4 plus 1e-5 of the largest logit (a
# 30-layer model with logits near 30 rounds to about 1e-4 on its own; a wrong merge is off by far more).
VERIFY_ATOL = 1e-4
VERIFY_RTOL = 1e-5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "vocab.txt")
EXPORT_FILES = ("config.json", "generation_config.json", INDEX_FILE, *TOKENIZER_FILES, art.TEMPLATE_FILE,
                "README.md", MERGE_REPORT, art.ADAPTER_CONFIG, art.ADAPTER_WEIGHTS, art.CONFIG_FILE,
                art.FINGERPRINT_FILE, art.RESULTS_FILE, art.PLOT_FILE)
SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
# Adapter features whose merge is more than W + scale * B @ A (peft's merge_and_unload handles some), with
# the value that leaves each off; peft switches most on with any other value, even 0 or [].
_UNSUPPORTED = {**dict.fromkeys(("use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"), False),
                **dict.fromkeys(("modules_to_save", "layer_replication", "trainable_token_indices", "target_parameters",
                                 "alora_invocation_tokens", "monteclora_config", "velora_config", "kasa_config",
                                 "arrow_config", "use_bdlora"), None)}
_PROBE = ("Name three primary colors.", "Low-rank adapters add a small update to each frozen weight matrix.")


@dataclass
class _Plan:
    """What the merge reads: the adapter's updates and where each base tensor lives."""

    adapter_dir: Path
    base_name: str
    base_dir: Path
    lora_config: dict[str, Any]
    adapter: adapter_files.LoraAdapter
    template: PromptTemplate
    probe_ids: torch.Tensor  # (2, T): the verification's probe, tokenized when the tokenizer was checked
    base_files: dict[str, Path]  # base tensor name -> safetensors file
    updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)  # weight -> A, B, scale
    fingerprint_diffs: list[str] = field(default_factory=list)
    quantize: set[str] = field(default_factory=set)  # weights rounded through 4-bit first ("dequantized")
    quant_type: str | None = None
    quant_dtype: torch.dtype = torch.float32


def merge(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | Path | None = None,
    dtype: str = "float16",
    max_shard_size: int | str = "2GB",
    merge_into: str = "original",
    allow_base_mismatch: bool = False,
    verify: bool = True,
) -> Path:
    """Fold a LoRA adapter into its base model and write a standalone, pickle-free model folder.

    The update ``W + (alpha / r) * B @ A`` is computed in fp32 and cast to ``dtype`` tensor by tensor,
    so memory stays near one tensor whatever the model size. The base is re-read unquantized, never
    merged into 4-bit weights, whose rounding would be baked into the export.

    ``merge_into`` chooses the weights the update is added to:

    - ``"original"`` (default): the original full-precision base. The export keeps the base's full
      precision, but its forward differs slightly from training, where the adapter learned to
      correct the NF4-rounded base (the gap is the 4-bit quantization error, small for real models).
    - ``"dequantized"``: each base linear weight is first rounded through 4-bit exactly as training
      loaded it (bitsandbytes, blocksize 64, double quantization, the recorded ``quantization``), so
      the merged model computes what the adapter saw in training, at the cost of carrying the 4-bit
      rounding into a 16-bit export.

    Args:
        adapter_dir: A folder written by :func:`alpaca_lora.finetune` (or any peft LoRA folder).
        output_dir: Where the merged model goes: a new or empty folder, or an earlier export.
        base_model: The base to merge into; None takes the one recorded in ``adapter_dir``.
        dtype: Export dtype: "float16", "bfloat16" or "float32".
        max_shard_size: Largest safetensors shard, in bytes or as "500MB", "2GB", "1GiB".
        merge_into: "original" or "dequantized" (see above).
        allow_base_mismatch: Merge even when the base's fingerprint differs from the recorded one.
        verify: Check merged logits against base + unmerged adapter on a probe batch (fp32).

    Returns:
        ``output_dir``: safetensors shards, config, generation config, tokenizer, prompt template,
        a model card (README.md) and ``merge_report.json``.

    An adapter that changes nothing (every lora_B zero: untrained, e.g. saved at step 0) is refused,
    so an empty adapter is never exported as a fine-tuned model.

    Raises:
        ConfigError: A bad argument, or an ``output_dir`` that is a file, a non-empty folder that is no
            earlier export, or a folder inside the adapter or base folder.
        ModelError: A damaged adapter (unreadable files, fields of the wrong type, a rank or target
            modules that do not match its weights, NaN/inf values: training diverged); no usable base,
            or a base that does not fit the adapter; a merged weight that is not finite in ``dtype``;
            or failed verification.

    Example:
        >>> merge("lora-alpaca", "merged")  # doctest: +SKIP

    """
    out_dtype = _check_args(dtype, merge_into, adapter_dir, output_dir, base_model, allow_base_mismatch, verify)
    shard_bytes = parse_size(max_shard_size)
    plan = _plan(Path(adapter_dir), base_model, allow_base_mismatch)
    if merge_into == "dequantized":
        _plan_dequantized(plan)
    target = _prepare_output(Path(output_dir), plan)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        weight_files = _write_weights(plan, tmp, out_dtype, shard_bytes)
        _write_side_files(plan, tmp, out_dtype)
        report: dict[str, Any] = {
            "base_model": plan.base_name, "base_path": str(plan.base_dir), "adapter_dir": str(plan.adapter_dir),
            "dtype": dtype, "merge_into": merge_into, "max_shard_size": shard_bytes, "weight_files": weight_files,
            "adapted_weights": len(plan.updates), "base_fingerprint_differences": plan.fingerprint_diffs,
            "verification": _verify(plan, tmp, out_dtype) if verify else None,
        }
        (tmp / "README.md").write_text(_model_card(plan, report), encoding="utf-8")
        art.write_json(tmp / MERGE_REPORT, report)
        for item in tmp.iterdir():
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("merged %s into %s -> %s", plan.adapter_dir, plan.base_name, target)
    return target


def _check_args(dtype: Any, merge_into: Any, adapter_dir: Any, output_dir: Any, base_model: Any,
                allow_base_mismatch: Any, verify: Any) -> torch.dtype:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ConfigError(f"dtype={shown(dtype)}: must be one of {list(DTYPES)} (float16 halves the export size)")
    if not isinstance(merge_into, str) or merge_into not in MERGE_TARGETS:
        raise ConfigError(f"merge_into={shown(merge_into)}: must be one of {list(MERGE_TARGETS)}")
    for name, value in (("adapter_dir", adapter_dir), ("output_dir", output_dir), ("base_model", base_model)):
        if not (isinstance(value, (str, Path)) or (name == "base_model" and value is None)):
            raise ConfigError(f"{name}={shown(value)}: must be a folder path" + (" or None" * (name == "base_model")))
    for name, value in (("allow_base_mismatch", allow_base_mismatch), ("verify", verify)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={shown(value)}: must be True or False")
    for name, value in (("adapter_dir", adapter_dir), ("output_dir", output_dir), ("base_model", base_model)):
        try:
            if value is not None:
                Path(value).expanduser().exists()
        except OSError as exc:  # a name too long for a path, or a folder this user may not enter
            raise ConfigError(f"{name}={shown(str(value))}: not a usable path ({exc.strerror})") from None
    if base_model is not None and Path(base_model).expanduser().is_file():
        raise ModelError(f"base_model={shown(str(base_model))} is a file; pass the folder that holds the base "
                         "model's config.json and safetensors weights")
    return DTYPES[dtype]


def parse_size(size: int | str) -> int:
    """Return a shard size in bytes from an int or a string like "500MB", "2GB" or "1GiB"."""
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper()) if isinstance(size, str) else None
    value = int(size) if isinstance(size, int) and not isinstance(size, bool) else (
        int(float(match.group(1)) * units[match.group(2)]) if match and match.group(2) in units else 0)
    if value < 1:
        raise ConfigError(f"max_shard_size={shown(size)}: give a positive byte count or a size like '500MB' or '2GB'")
    return value


# ---- plan: adapter, base, fingerprint --------------------------------------------------------------


def _plan(adapter_dir: Path, base_model: str | Path | None, allow_mismatch: bool) -> _Plan:
    """Read and check everything the merge needs before a byte is written: adapter, template, base, tokenizer."""
    from alpaca_lora.model.load import load_tokenizer

    if not art.is_run_folder(adapter_dir):
        raise ModelError(f"{adapter_dir} holds no {art.ADAPTER_CONFIG}; pass the output folder of finetune()")
    weights = adapter_dir / art.ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{weights} is missing; the adapter folder is incomplete, re-run finetune or copy it again")
    adapter = adapter_files.read_lora_adapter(adapter_dir / art.ADAPTER_CONFIG, weights)
    lora = art.read_json(adapter_dir / art.ADAPTER_CONFIG)
    used = [k for k, off in _UNSUPPORTED.items() if lora.get(k, off) != off] + (
        ["bias"] if adapter.config.bias != "none" else [])
    if used:
        raise ModelError(f"the adapter in {adapter_dir} uses {used}; merge() folds plain LoRA on linear layers. "
                         "Merge it with peft's merge_and_unload() on a full-precision model instead")
    base_name, base_dir, diffs = art.resolve_adapter_base(adapter_dir, base_model)
    if diffs and not allow_mismatch:
        raise ModelError(f"the base {base_dir} is not the model the adapter in {adapter_dir} was trained on "
                         f"({'; '.join(diffs)}). Pass the original base as base_model=, or allow_base_mismatch=True "
                         "if you are sure the weights are compatible")
    if diffs:
        logger.warning("base %s differs from the one %s was trained on: %s", base_dir, adapter_dir, "; ".join(diffs))
    base_files = _base_files(base_dir)
    shapes = {n.removesuffix(".weight"): (s[0], s[1]) for n, s in art.safetensors_shapes(base_dir).items()
              if n.endswith(".weight") and len(s) == 2 and n in base_files}
    recorded = not diffs and (adapter_dir / art.FINGERPRINT_FILE).is_file()  # the very base it was trained on
    adapter_files.check_lora_fits(adapter, shapes, base_dir, complete=recorded)
    if adapter.untrained:  # refused before anything is written (tloen/alpaca-lora#293 exported such adapters)
        raise ModelError(f"the adapter in {adapter_dir} does not change the model's logits at all: it is untrained or "
                         "was saved empty (every lora_B matrix is zero, e.g. saved at step 0); re-run finetune")
    _base_config(base_dir)
    has_tokenizer = any((adapter_dir / f).is_file() for f in TOKENIZER_FILES)
    template = _template(adapter_dir)
    probe = _probe_ids(load_tokenizer(adapter_dir if has_tokenizer else base_dir), template)  # what the export ships
    plan = _Plan(adapter_dir, base_name, base_dir, lora, adapter, template, probe, base_files, fingerprint_diffs=diffs)
    plan.updates = {f"{m}.weight": (a.float(), b.float(), _scale(adapter, m)) for m, (a, b) in adapter.pairs.items()}
    return plan


def _template(adapter_dir: Path) -> PromptTemplate:
    """The adapter's saved prompt template (``alpaca`` when it saved none); a damaged one is a ModelError."""
    saved = adapter_dir / art.TEMPLATE_FILE
    if not saved.is_file():
        return get_template("alpaca")
    try:
        return get_template(art.read_json(saved))
    except ConfigError as exc:
        raise ModelError(f"{saved} is not a usable prompt template ({exc}); restore it from the training run") from None


def _base_files(base_dir: Path) -> dict[str, Path]:
    """Map every tensor of the base checkpoint to its safetensors file (index file or all shards), headers checked."""
    index = base_dir / INDEX_FILE
    if index.is_file():
        weight_map = art.read_json(index).get("weight_map")
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) and v == Path(v).name
                                                     and (base_dir / v).is_file() for v in weight_map.values())):
            raise ModelError(f"{index} has no weight_map of tensor names to safetensors files of {base_dir}; the "
                             "index is damaged or the shards are missing: copy or download the base again")
        files.check_weight_files(base_dir)
        return {k: base_dir / v for k, v in weight_map.items()}
    found: dict[str, Path] = {}
    for file in sorted(base_dir.glob("*.safetensors")):
        found.update(dict.fromkeys(files.tensor_shapes(file), file))
    if not found:
        raise ModelError(f"{base_dir} holds no *.safetensors weights; only safetensors are loaded, "
                         "convert the checkpoint with transformers' save_pretrained(safe_serialization=True)")
    return found


def _scale(adapter: adapter_files.LoraAdapter, module: str) -> float:
    """LoRA scaling of ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA, by peft's pattern rules."""
    return adapter.scale(module)


def _plan_dequantized(plan: _Plan) -> None:
    """Mark the weights training held in 4-bit: every linear layer except the output embedding."""
    from alpaca_lora.model.load import resolve_compute_dtype, resolve_device

    cfg_file = plan.adapter_dir / art.CONFIG_FILE
    cfg = art.read_json(cfg_file) if cfg_file.is_file() else {}
    if cfg.get("quantization") not in ("nf4", "fp4"):
        raise ConfigError(f"merge_into='dequantized' needs an adapter trained on a 4-bit (nf4/fp4) base, but "
                          f"{cfg_file} records quantization={shown(cfg.get('quantization'))}; use "
                          "merge_into='original'")
    plan.quant_type = cfg["quantization"]
    # Training quantized the weights after casting them to the compute dtype; do the same. "auto" differs
    # between machines (bf16 or fp32 on a CPU), so the dtype the run recorded comes first.
    results_file = plan.adapter_dir / art.RESULTS_FILE
    results = art.read_json(results_file) if results_file.is_file() else {}
    trained_in = results.get("compute_dtype") if isinstance(results, dict) else None
    recorded = trained_in if trained_in in ("float32", "bfloat16", "float16") else cfg.get("compute_dtype", "auto")
    if recorded not in ("auto", "float32", "bfloat16", "float16"):
        raise ModelError(f"{cfg_file} records compute_dtype={shown(recorded)}, not a dtype training uses; the file "
                         "is damaged: restore it from the training run, or use merge_into='original'")
    plan.quant_dtype = resolve_compute_dtype(recorded, resolve_device("auto"))
    model = skeleton(plan.base_dir)
    head = model.get_output_embeddings()
    linear = (n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head)
    plan.quantize = {f"{n}.weight" for n in linear}


# ---- weights ---------------------------------------------------------------------------------------


def _base_tensor(plan: _Plan, name: str) -> torch.Tensor:
    """The base tensor ``name``: fp32 when floating, rounded through 4-bit first for "dequantized"."""
    w = read_tensor(plan.base_files, name)
    if not w.is_floating_point():
        return w
    return _roundtrip_4bit(w, plan) if name in plan.quantize else w.float()


def _merged_tensor(plan: _Plan, name: str) -> torch.Tensor:
    """The base tensor ``name`` plus its LoRA update (computed in fp32)."""
    w = _base_tensor(plan, name)
    if name in plan.updates:
        a, b, scale = plan.updates[name]
        w += scale * (b @ a)  # (out, r) @ (r, in)
    return w


def _within(t: torch.Tensor, bound: float) -> bool:
    """Whether every value of ``t`` is a number of magnitude <= ``bound`` (NaN is not), in 1M-value blocks."""
    return all(bool(block.abs().le(bound).all()) for block in t.reshape(-1).split(2**20))


def _finite(plan: _Plan, name: str, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``merged`` cast to ``dtype``, refused if it is not finite there (an export must never hold NaN or inf)."""
    if not (merged.is_floating_point() and dtype.is_floating_point) or _within(merged, torch.finfo(dtype).max):
        return merged.to(dtype)
    if _within(merged, torch.finfo(torch.float32).max):
        raise ModelError(f"the merged {name} exceeds the range of {dtype} (largest |value| "
                         f"{float(merged.abs().max()):.3g}), so the export would hold infinities; merge with "
                         "dtype='bfloat16' or 'float32'")
    if not _within(_base_tensor(plan, name), torch.finfo(torch.float32).max):
        raise ModelError(f"{name} of the base {plan.base_dir} holds NaN or infinite values: the base checkpoint is "
                         "damaged; copy or download it again")
    raise ModelError(f"the LoRA update of {name} overflows float32 (scale {plan.updates[name][2]:.3g}); check "
                     f"lora_alpha in {plan.adapter.config_file}, or retrain with a lower learning_rate")


def _roundtrip_4bit(w: torch.Tensor, plan: _Plan) -> torch.Tensor:
    from alpaca_lora.model.bnb_import import import_bitsandbytes

    bnbf = import_bitsandbytes().functional

    q, state = bnbf.quantize_4bit(w.to(plan.quant_dtype).contiguous(), blocksize=64, compress_statistics=True,
                                  quant_type=plan.quant_type, quant_storage=torch.uint8)
    return bnbf.dequantize_4bit(q, state).float()


def _write_weights(plan: _Plan, out: Path, dtype: torch.dtype, shard_bytes: int) -> list[str]:
    """Write merged tensors as safetensors shards, streaming one tensor at a time; return the file names."""
    from tqdm.auto import tqdm

    metas = tensor_metas(plan.base_files)
    names = sorted(metas)
    out_dtype = {n: dtype if metas[n][1].is_floating_point else metas[n][1] for n in names}
    nbytes = {n: math.prod(metas[n][0]) * out_dtype[n].itemsize for n in names}
    shards: list[list[str]] = [[]]
    filled = 0
    for n in names:  # a tensor larger than the limit gets a shard of its own
        if shards[-1] and filled + nbytes[n] > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(n)
        filled += nbytes[n]
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = tqdm(total=len(names), desc="merge", unit="tensor", leave=False)
    for file, shard in zip(files, shards, strict=True):
        with SafetensorsWriter(out / file, {n: (metas[n][0], out_dtype[n]) for n in shard}) as writer:
            for n in shard:
                writer.write(n, _finite(plan, n, _merged_tensor(plan, n), out_dtype[n]))
                bar.update(1)
                if nbytes[n] > 2**20:
                    release_free_memory()
    bar.close()
    if len(files) > 1:
        art.write_json(out / INDEX_FILE, {"metadata": {"total_size": sum(nbytes.values())},
                                          "weight_map": {n: f for f, s in zip(files, shards, strict=True) for n in s}})
    return files


# ---- side files ------------------------------------------------------------------------------------


def _prepare_output(target: Path, plan: _Plan) -> Path:
    target = target.expanduser()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"output_dir {target} is a file; pass a folder for the merged model")
    for other, what in ((plan.adapter_dir, "adapter"), (plan.base_dir, "base model")):
        if target.resolve() == other.resolve():
            raise ConfigError(f"output_dir {target} is the {what} folder; pass a new folder for the merged model")
        if other.resolve() in target.resolve().parents:  # its files would be read back as the folder's own
            raise ConfigError(f"output_dir {target} is inside the {what} folder {other}; pass a folder outside it")
    if target.is_dir() and any(target.iterdir()):
        if not (target / MERGE_REPORT).is_file():
            raise ConfigError(f"output_dir {target} is not empty and holds no earlier export; pass a new folder")
        for item in target.iterdir():  # an earlier export: drop its weights so no stale shard survives
            if SHARD_NAME.fullmatch(item.name) or item.name == INDEX_FILE:
                item.unlink()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output_dir {target} ({exc.strerror}); pass a folder you can write") from None
    return target


def _base_config(base_dir: Path) -> Any:
    """The base's transformers config, read before the merge writes anything."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{base_dir / 'config.json'} cannot be read as a model config ({type(exc).__name__}: "
                         f"{shown(str(exc))}); the base is damaged: copy or download it again") from None


def _write_side_files(plan: _Plan, out: Path, dtype: torch.dtype) -> None:
    """Config (with the export dtype), generation config, tokenizer and prompt template."""
    config = _base_config(plan.base_dir)
    config.dtype = dtype
    config.save_pretrained(out)
    if (plan.base_dir / "generation_config.json").is_file():
        shutil.copyfile(plan.base_dir / "generation_config.json", out / "generation_config.json")
    source = plan.adapter_dir if any((plan.adapter_dir / f).is_file() for f in TOKENIZER_FILES) else plan.base_dir
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if (plan.adapter_dir / art.TEMPLATE_FILE).is_file():
        shutil.copyfile(plan.adapter_dir / art.TEMPLATE_FILE, out / art.TEMPLATE_FILE)


def _model_card(plan: _Plan, report: dict[str, Any]) -> str:
    """README.md: what was trained and merged, the merge check, and how to load the model."""
    def read(name: str) -> dict[str, Any]:  # records for the card only: a damaged one leaves its rows blank
        try:
            return art.read_json(plan.adapter_dir / name) if (plan.adapter_dir / name).is_file() else {}
        except ModelError as exc:
            logger.warning("the model card leaves out %s: %s", name, exc)
            return {}

    cfg, results, data = read(art.CONFIG_FILE), read(art.RESULTS_FILE), read(art.FINGERPRINT_FILE).get("data", {})
    data = data if isinstance(data, dict) else {}
    template = plan.template
    lora, check = plan.lora_config, report["verification"]
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", plan.base_name) and not Path(plan.base_name).exists()
    metrics = {k: results[k] for k in ("train_loss", "eval_loss", "steps", "tokens_seen") if k in results}
    verified = "not run" if check is None else (
        f"max abs logit difference merged vs base + adapter {check['max_abs_logit_diff']:.2e} in fp32 (tolerance "
        f"{check['tolerance']:.2e}); the adapter moves the logits by up to "
        f"{check['adapter_effect_max_abs_logit_diff']:.3g}")
    return "\n".join([
        "---", "library_name: transformers", "tags: [alpaca-lora, lora, merged, text-generation]",
        *([f"base_model: {plan.base_name}"] if hub_id else []), "---", "",
        f"# {plan.adapter_dir.name} (merged)", "",
        f"A LoRA adapter trained with alpaca_lora on `{plan.base_name}`, merged into the {report['merge_into']} "
        f"base weights and saved as {report['dtype']} safetensors.", "",
        "| | |", "|---|---|",
        f"| Base model | `{plan.base_name}` |",
        f"| Prompt template | `{template.name}` (`{art.TEMPLATE_FILE}`) |",
        f"| LoRA | r={cfg.get('lora_r', lora.get('r'))}, alpha={cfg.get('lora_alpha', lora.get('lora_alpha'))}, "
        f"dropout={cfg.get('lora_dropout', lora.get('lora_dropout'))}, "
        f"targets={cfg.get('lora_target_modules', lora.get('target_modules'))} |",
        f"| Base during training | {cfg.get('quantization') or 'full precision'}, "
        f"compute {cfg.get('compute_dtype', 'unknown')} |",
        f"| Data | {data.get('num_records', '?')} records, sha256 `{data.get('sha256', '?')}` |",
        f"| Final metrics | `{json.dumps(metrics)}` |",
        f"| Merge check | {verified} |", "",
        "## Use with transformers", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", use_safetensors=True)',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        f"template = {template.prompt_no_input!r}",
        'prompt = template.replace("{instruction}", "Name three primary colors.")',
        'inputs = tokenizer(prompt, return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=128)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", "",
        "## Use with alpaca_lora", "", "```python", "from alpaca_lora import generate", "",
        'print(generate("PATH_OR_LOCAL_FOLDER", "Name three primary colors."))', "```", "",
    ])


# ---- verification ----------------------------------------------------------------------------------


def _verify(plan: _Plan, out: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Compare merged, unmerged (peft) and plain-base logits on a probe batch, streaming the weights."""
    written = _base_files(out)
    ids = plan.probe_ids

    def base(name: str) -> torch.Tensor:
        return _base_tensor(plan, name)

    def merged(name: str) -> torch.Tensor:
        m = _merged_tensor(plan, name)
        w = read_tensor(written, name)
        # The file must hold exactly the merged tensor, cast; compared in row blocks to bound memory.
        rows = zip(w.reshape(-1).split(2**20), m.reshape(-1).split(2**20), strict=True)
        if w.shape != m.shape or not all(torch.equal(a, b.to(a.dtype)) for a, b in rows):
            raise ModelError(f"{name} in the written export differs from the merged tensor; the disk may be full")
        return m

    def cast(name: str) -> torch.Tensor:
        w = read_tensor(written, name)
        return w.float() if w.is_floating_point() else w

    model = skeleton(plan.base_dir)
    with torch.no_grad():
        plain = streamed_logits(model, ids, base)
        merged_logits = streamed_logits(model, ids, merged)
        cast_logits = merged_logits if dtype == torch.float32 else streamed_logits(model, ids, cast)
        # Last: injecting peft's LoRA layers changes the skeleton for good.
        lora_config = copy.deepcopy(plan.adapter.config)  # as peft read it, checked in _plan
        # Exactly the modules the adapter holds weights for (a deeper base has layers it never saw).
        lora_config.target_modules = {n.removesuffix(".weight") for n in plan.updates}
        lora_config.init_lora_weights = False  # the weights come from the adapter; no initialiser runs on meta
        reference = streamed_logits(model, ids, _with_lora(plan, base), lora_config)
    diff = float((merged_logits - reference).abs().max())
    effect = float((reference - plain).abs().max())
    cast_diff = float((cast_logits - reference).abs().max())
    scale = float(reference.abs().max())
    tolerance = VERIFY_ATOL + VERIFY_RTOL * scale
    result = {"max_abs_logit_diff": diff, "tolerance": tolerance, "max_abs_logit": scale,
              "adapter_effect_max_abs_logit_diff": effect, "export_dtype_max_abs_logit_diff": cast_diff,
              "probe_shape": list(ids.shape), "passed": True}
    logger.info("merge check: max |merged - unmerged| = %.3g (tolerance %.3g), adapter effect %.3g",
                diff, tolerance, effect)
    if not diff <= tolerance:
        raise ModelError(f"merge verification failed: merged and unmerged logits differ by {diff:.3g} "
                         f"(> {tolerance:.3g} = {VERIFY_ATOL:g} + {VERIFY_RTOL:g} x the largest logit {scale:.3g}, "
                         "in fp32); please report this with your peft version. verify=False skips the check")
    if effect == 0.0:
        raise ModelError(f"the adapter in {plan.adapter_dir} does not change the model's logits at all: it is "
                         "untrained or was saved empty (tloen/alpaca-lora#293); re-run finetune")
    return result


def _probe_ids(tokenizer: Any, template: PromptTemplate) -> torch.Tensor:
    """A fixed (2, T) batch of token ids: an Alpaca prompt and a plain sentence, cut to one length."""
    rows = [tokenizer(t)["input_ids"] for t in (template.render(_PROBE[0]), _PROBE[1])]
    n = min(32, *map(len, rows))
    return torch.tensor([r[:n] for r in rows])


def _with_lora(plan: _Plan, base: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """Source for a peft-injected skeleton: LoRA A/B from the adapter, base_layer weights from ``base``."""
    def source(name: str) -> torch.Tensor:
        m = re.fullmatch(r"(.+)\.lora_([AB])\.[^.]+\.weight", name)
        if m:
            a, b, _ = plan.updates[f"{m.group(1)}.weight"]
            return a if m.group(2) == "A" else b
        return base(name.replace(".base_layer.", "."))

    return source
