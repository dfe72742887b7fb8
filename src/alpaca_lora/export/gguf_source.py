"""What a GGUF export reads: a model folder, or an adapter merged on the fly, one fp32 tensor at a time.

A merged folder (written by :func:`alpaca_lora.merge`) or any plain Llama folder is read tensor by tensor
from its safetensors. An adapter folder (written by :func:`alpaca_lora.finetune`) is merged as ``merge``
merges: each base weight read in fp32 and its ``scale * B @ A`` added, never the whole model in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alpaca_lora.data.prompts import PromptTemplate
from alpaca_lora.errors import ConfigError, ModelError
from alpaca_lora.export import layout as art
from alpaca_lora.export.plan import (
    MergePlan,
    base_config,
    merge_target,
    merged_tensor,
    plan_dequantized,
    plan_merge,
    probe_ids,
    saved_template,
    tensor_files,
    tensor_shape,
)
from alpaca_lora.export.safetensors_stream import read_tensor, tensor_metas
from alpaca_lora.model import folder_checks


@dataclass
class ModelSource:
    """A model to export: its config, tensors (fp32 on demand), tokenizer and provenance."""

    folder: Path
    config_dir: Path  # holds config.json
    config: Any
    names: list[str]  # transformers tensor names
    shapes: dict[str, list[int]]
    read: Callable[[str], torch.Tensor]
    tokenizer: Any
    tokenizer_dir: Path
    template: PromptTemplate
    probe: torch.Tensor  # (2, T) token ids for verification
    provenance: dict[str, str] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    plan: MergePlan | None = None  # set when the source is an adapter merged on the fly


def open_source(model_dir: Path, base_model: str | Path | None) -> ModelSource:
    """Read and check ``model_dir`` (a model folder or an adapter folder) before anything is written.

    Raises:
        ModelError: No such folder, custom code or special files, no safetensors weights, no tokenizer
            (``tokenizer.json``), or an adapter that does not fit its base.

    """
    from alpaca_lora.model.load import load_tokenizer

    if not model_dir.is_dir():
        raise ModelError(f"{model_dir} is not a folder; pass a merged model folder (from merge) or an adapter folder "
                         "(from finetune)")
    folder_checks.refuse_special_files(model_dir)
    folder_checks.refuse_custom_code(model_dir)
    template = saved_template(model_dir)
    if art.is_run_folder(model_dir):
        plan = plan_merge(model_dir, base_model, False)
        if merge_target("auto", model_dir) == "dequantized":  # as merge() would (a LoftQ adapter)
            plan_dequantized(plan)
        config_dir, files = plan.base_dir, plan.base_files
        tok_dir = model_dir if (model_dir / "tokenizer.json").is_file() else plan.base_dir

        def read(name: str) -> torch.Tensor:
            return merged_tensor(plan, name)
    else:
        if base_model is not None:
            raise ConfigError(f"base_model= is for adapter folders; {model_dir} holds a whole model "
                              f"(no {art.ADAPTER_CONFIG}): leave base_model out")
        plan, config_dir, tok_dir = None, model_dir, model_dir
        files = tensor_files(model_dir)

        def read(name: str) -> torch.Tensor:
            t = read_tensor(files, name)
            return t.float() if t.is_floating_point() else t
    if not (tok_dir / "tokenizer.json").is_file():
        raise ModelError(f"{tok_dir} holds no tokenizer.json; a GGUF carries its tokenizer. Copy the tokenizer files "
                         "of the base model (tokenizer.json, tokenizer_config.json) into the folder")
    tokenizer = load_tokenizer(tok_dir)
    shapes = {name: tensor_shape(plan, name, meta[0]) if plan else meta[0]
              for name, meta in tensor_metas(files).items()}
    probe = plan.probe_ids if plan else probe_ids(tokenizer, template)
    config = base_config(config_dir)
    if plan is not None and plan.vocab_size:  # the adapter's new tokens grew the embedding
        config.vocab_size = plan.vocab_size
    source = ModelSource(model_dir, config_dir, config, sorted(files), shapes, read, tokenizer,
                         tok_dir, template, probe, plan=plan)
    source.provenance = _provenance(model_dir, plan)
    source.generation = _generation(config_dir)
    return source


def chat_template_of(source: ModelSource) -> str | None:
    """The chat template training used: the tokenizer's, else the Alpaca prompt template rendered as one."""
    from alpaca_lora.data.chat_templates import alpaca_chat_template

    saved = getattr(source.tokenizer, "chat_template", None)
    if isinstance(saved, dict):
        saved = saved.get("default")
    if isinstance(saved, str) and saved:
        return saved
    if (source.folder / art.TEMPLATE_FILE).is_file():
        return alpaca_chat_template(source.template, source.tokenizer)
    return None


def _provenance(folder: Path, plan: MergePlan | None) -> dict[str, str]:
    """Where the weights came from: base model, data fingerprint, LoRA settings (strings for GGUF keys)."""
    import json

    def read(name: str) -> dict[str, Any]:
        path = folder / name
        return art.read_json(path) if path.is_file() else {}

    report, cfg, fp = read(art.MERGE_REPORT), read(art.CONFIG_FILE), read(art.FINGERPRINT_FILE)
    data = fp.get("data") if isinstance(fp.get("data"), dict) else {}
    from importlib.metadata import PackageNotFoundError, version

    try:
        exported_by = f"alpaca_lora {version('alpaca_lora')}"
    except PackageNotFoundError:  # running from a source tree that was never installed
        exported_by = "alpaca_lora"
    out = {"exported_by": exported_by, "source": folder.name}
    base = plan.base_name if plan else report.get("base_model") or cfg.get("base_model")
    if isinstance(base, str) and base:  # a local path is named by its folder alone: no user paths in a shared file
        out["base_model"] = Path(base).name if Path(base).is_absolute() or Path(base).exists() else base
    if isinstance(data.get("sha256"), str):
        out["data_sha256"] = data["sha256"]
    if isinstance(data.get("num_records"), int):
        out["data_records"] = str(data["num_records"])
    lora = {k: cfg[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "quantization",
                                "compute_dtype") if k in cfg}
    if lora:
        out["lora"] = json.dumps(lora, sort_keys=True)
    if plan is not None:
        out["merged"] = "on export, into the original full-precision base"
    elif report:
        out["merged"] = f"by merge(), into the {report.get('merge_into', 'original')} base, {report.get('dtype')}"
    return out


def _generation(config_dir: Path) -> dict[str, Any]:
    """Sampling settings of ``generation_config.json`` (empty when it has none or does not sample)."""
    path = config_dir / "generation_config.json"
    gen = art.read_json(path) if path.is_file() else {}
    if not gen.get("do_sample"):
        return {}
    return {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")
            if isinstance(gen.get(k), (int, float)) and not isinstance(gen.get(k), bool)}
