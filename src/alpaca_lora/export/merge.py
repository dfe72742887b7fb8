"""merge(): fold a LoRA adapter into full-precision base weights, verify, export.

The merge streams the base checkpoint tensor by tensor: each weight is read in fp32, the update
``scale * B @ A`` is added where the adapter has one, and the result is cast to the export dtype
and appended to a safetensors shard on disk. Memory holds one tensor at a time, never the model.
What it reads is checked first (:mod:`alpaca_lora.export.plan`), and the written export is checked
against the unmerged adapter after (:mod:`alpaca_lora.export.verify`). Its peak memory is measured
in docs/performance.md ("Merging").
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from alpaca_lora.config_lora import lora_variants
from alpaca_lora.data.prompts import PromptTemplate
from alpaca_lora.errors import ConfigError, ModelError, shown
from alpaca_lora.export import layout as art
from alpaca_lora.export.plan import (
    MergePlan,
    base_config,
    base_tensor,
    merge_target,
    merged_tensor,
    plan_dequantized,
    plan_merge,
    tensor_shape,
)
from alpaca_lora.export.safetensors_stream import SafetensorsWriter, release_free_memory, tensor_metas
from alpaca_lora.export.verify import verify_merge
from alpaca_lora.model.dtypes import DTYPES

logger = logging.getLogger(__name__)

MERGE_TARGETS = ("auto", "original", "dequantized")
MERGE_REPORT = art.MERGE_REPORT
EXPORT_FILES = ("config.json", "generation_config.json", art.INDEX_FILE, *art.TOKENIZER_FILES, art.TEMPLATE_FILE,
                "README.md", MERGE_REPORT, art.ADAPTER_CONFIG, art.ADAPTER_WEIGHTS, art.CONFIG_FILE,
                art.FINGERPRINT_FILE, art.RESULTS_FILE, art.PLOT_FILE)
SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def merge(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | Path | None = None,
    dtype: str = "float16",
    max_shard_size: int | str = "2GB",
    merge_into: str = "auto",
    allow_base_mismatch: bool = False,
    verify: bool = True,
) -> Path:
    """Fold a LoRA adapter into its base model and write a standalone, pickle-free model folder.

    The update ``W + (alpha / r) * B @ A`` is computed in fp32 and cast to ``dtype`` tensor by tensor,
    so memory stays near one tensor whatever the model size. The base is re-read unquantized, never
    merged into 4-bit weights, whose rounding would be baked into the export.

    ``merge_into`` chooses the weights the update is added to:

    - ``"auto"`` (default): ``"dequantized"`` for an adapter trained with ``init_lora_weights="loftq"``
      (it corrects the NF4 rounding, so it belongs on the rounded weights), else ``"original"``.
    - ``"original"``: the original full-precision base. The export keeps the base's full
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
        merge_into: "auto", "original" or "dequantized" (see above).
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
    plan = plan_merge(Path(adapter_dir), base_model, allow_base_mismatch)
    merge_into = merge_target(merge_into, Path(adapter_dir))
    if merge_into == "dequantized":
        plan_dequantized(plan)
    target = _prepare_output(Path(output_dir), plan)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        weight_files = _write_weights(plan, tmp, out_dtype, shard_bytes)
        _write_side_files(plan, tmp, out_dtype)
        report: dict[str, Any] = {
            "base_model": plan.base_name, "base_path": str(plan.base_dir), "adapter_dir": str(plan.adapter_dir),
            "dtype": dtype, "merge_into": merge_into, "max_shard_size": shard_bytes, "weight_files": weight_files,
            "adapted_weights": len(plan.updates), "base_fingerprint_differences": plan.fingerprint_diffs,
            "verification": verify_merge(plan, tmp, out_dtype) if verify else None,
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


# ---- weights ---------------------------------------------------------------------------------------


def _within(t: torch.Tensor, bound: float) -> bool:
    """Whether every value of ``t`` is a number of magnitude <= ``bound`` (NaN is not), in 1M-value blocks."""
    return all(bool(block.abs().le(bound).all()) for block in t.reshape(-1).split(2**20))


def _finite(plan: MergePlan, name: str, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``merged`` cast to ``dtype``, refused if it is not finite there (an export must never hold NaN or inf)."""
    if not (merged.is_floating_point() and dtype.is_floating_point) or _within(merged, torch.finfo(dtype).max):
        return merged.to(dtype)
    if _within(merged, torch.finfo(torch.float32).max):
        raise ModelError(f"the merged {name} exceeds the range of {dtype} (largest |value| "
                         f"{float(merged.abs().max()):.3g}), so the export would hold infinities; merge with "
                         "dtype='bfloat16' or 'float32'")
    if not _within(base_tensor(plan, name), torch.finfo(torch.float32).max):
        raise ModelError(f"{name} of the base {plan.base_dir} holds NaN or infinite values: the base checkpoint is "
                         "damaged; copy or download it again")
    raise ModelError(f"the LoRA update of {name} overflows float32 (scale {plan.updates[name][2]:.3g}); check "
                     f"lora_alpha in {plan.adapter.config_file}, or retrain with a lower learning_rate")


def _write_weights(plan: MergePlan, out: Path, dtype: torch.dtype, shard_bytes: int) -> list[str]:
    """Write merged tensors as safetensors shards, streaming one tensor at a time; return the file names."""
    from tqdm.auto import tqdm

    metas = {n: (tensor_shape(plan, n, shape), dt) for n, (shape, dt) in tensor_metas(plan.base_files).items()}
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
                writer.write(n, _finite(plan, n, merged_tensor(plan, n), out_dtype[n]))
                bar.update(1)
                if nbytes[n] > 2**20:
                    release_free_memory()
    bar.close()
    if len(files) > 1:
        art.write_json(out / art.INDEX_FILE, {"metadata": {"total_size": sum(nbytes.values())},
                                          "weight_map": {n: f for f, s in zip(files, shards, strict=True) for n in s}})
    return files


# ---- side files ------------------------------------------------------------------------------------


def _prepare_output(target: Path, plan: MergePlan) -> Path:
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
            if SHARD_NAME.fullmatch(item.name) or item.name == art.INDEX_FILE:
                item.unlink()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output_dir {target} ({exc.strerror}); pass a folder you can write") from None
    return target


def _write_side_files(plan: MergePlan, out: Path, dtype: torch.dtype) -> None:
    """Config (with the export dtype), generation config, tokenizer and prompt template."""
    config = base_config(plan.base_dir)
    config.dtype = dtype
    if plan.vocab_size:  # new tokens grew the embedding
        config.vocab_size = plan.vocab_size
    config.save_pretrained(out)
    if (plan.base_dir / "generation_config.json").is_file():
        shutil.copyfile(plan.base_dir / "generation_config.json", out / "generation_config.json")
    source = plan.adapter_dir if any((plan.adapter_dir / f).is_file() for f in art.TOKENIZER_FILES) else plan.base_dir
    for name in art.TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    for name in (art.TEMPLATE_FILE, art.CONFIG_FILE, art.FINGERPRINT_FILE):  # the prompt format and provenance
        if (plan.adapter_dir / name).is_file():
            shutil.copyfile(plan.adapter_dir / name, out / name)


def _model_card(plan: MergePlan, report: dict[str, Any]) -> str:
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
    chat = not (plan.adapter_dir / art.TEMPLATE_FILE).is_file() and (plan.adapter_dir / "chat_template.jinja").is_file()
    lora, check = plan.lora_config, report["verification"]
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", plan.base_name) and not Path(plan.base_name).exists()
    metrics = {k: results[k] for k in ("train_loss", "eval_loss", "steps", "tokens_seen") if k in results}
    if isinstance(results.get("eval_scores"), dict):  # generation metrics of eval_generate_samples
        metrics.update({k: round(v, 4) for k, v in results["eval_scores"].items() if isinstance(v, (int, float))})
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
        ("| Prompt format | the chat template training rendered conversations with (`chat_template.jinja`) |" if chat
         else f"| Prompt template | `{template.name}` (`{art.TEMPLATE_FILE}`; also as `chat_template.jinja`) |"),
        f"| LoRA | r={cfg.get('lora_r', lora.get('r'))}, alpha={cfg.get('lora_alpha', lora.get('lora_alpha'))}, "
        f"dropout={cfg.get('lora_dropout', lora.get('lora_dropout'))}, "
        f"targets={cfg.get('lora_target_modules', lora.get('target_modules'))}"
        + "".join(f", {v}" for v in lora_variants(cfg)) + " |",
        f"| Base during training | {cfg.get('quantization') or 'full precision'}, "
        f"compute {cfg.get('compute_dtype', 'unknown')} |",
        f"| Data | {data.get('num_records', '?')} records, sha256 `{data.get('sha256', '?')}` |",
        f"| Final metrics | `{json.dumps(metrics)}` |",
        f"| Merge check | {verified} |", "",
        "## Use with transformers", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", use_safetensors=True)',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        *(_chat_usage() if chat else _alpaca_usage(template)),
        "output = model.generate(**inputs, max_new_tokens=128)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", "",
        "## Use with alpaca_lora", "", "```python", "from alpaca_lora import generate", "",
        'print(generate("PATH_OR_LOCAL_FOLDER", [{"role": "user", "content": "Name three primary colors."}]))'
        if chat else 'print(generate("PATH_OR_LOCAL_FOLDER", "Name three primary colors."))', "```", "",
    ])


def _alpaca_usage(template: PromptTemplate) -> list[str]:
    return [f"template = {template.prompt_no_input!r}",
            'prompt = template.replace("{instruction}", "Name three primary colors.")',
            'inputs = tokenizer(prompt, return_tensors="pt")']


def _chat_usage() -> list[str]:
    return ['messages = [{"role": "user", "content": "Name three primary colors."}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt',",
            "                                       return_dict=True)"]
