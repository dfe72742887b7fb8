"""What a merge reads, checked before a byte is written: the adapter, its base, and each merged tensor.

:func:`plan_merge` reads and checks the adapter, finds and checks its base (fingerprint, shapes), the
prompt template and the tokenizer, and maps every base tensor to its safetensors file;
:func:`merged_tensor` then gives one merged weight at a time, computed in fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alpaca_lora import files
from alpaca_lora.data.prompts import PromptTemplate, get_template
from alpaca_lora.errors import ConfigError, ModelError, shown
from alpaca_lora.export import fingerprint
from alpaca_lora.export import layout as art
from alpaca_lora.export.safetensors_stream import read_tensor, skeleton
from alpaca_lora.model import adapter_files
from alpaca_lora.model.dtypes import DTYPES

logger = logging.getLogger(__name__)

# Adapter features whose merge is more than W + scale * B @ A (peft's merge_and_unload handles some), with
# the value that leaves each off; peft switches most on with any other value, even 0 or [].
_UNSUPPORTED = {**dict.fromkeys(("fan_in_fan_out", "lora_bias", "use_qalora"), False),
                **dict.fromkeys(("layer_replication", "target_parameters",
                                 "alora_invocation_tokens", "monteclora_config", "velora_config", "kasa_config",
                                 "arrow_config", "use_bdlora"), None)}
_PROBE = ("Name three primary colors.", "Low-rank adapters add a small update to each frozen weight matrix.")


@dataclass
class MergePlan:
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
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA: weight -> magnitude per output row
    token_rows: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)  # embedding -> new-token rows
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # whole layers the adapter trained (new tokens)
    vocab_size: int | None = None  # the grown vocabulary (new tokens), or None: the base's
    fingerprint_diffs: list[str] = field(default_factory=list)
    quantize: set[str] = field(default_factory=set)  # weights rounded through 4-bit first ("dequantized")
    quant_type: str | None = None
    quant_dtype: torch.dtype = torch.float32


def plan_merge(adapter_dir: Path, base_model: str | Path | None, allow_mismatch: bool) -> MergePlan:
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
        raise ModelError(f"the adapter in {adapter_dir} uses {used}; merge() folds LoRA and DoRA on linear layers. "
                         "Merge it with peft's merge_and_unload() on a full-precision model instead")
    base_name, base_dir, diffs = fingerprint.resolve_adapter_base(adapter_dir, base_model)
    if diffs and not allow_mismatch:
        raise ModelError(f"the base {base_dir} is not the model the adapter in {adapter_dir} was trained on "
                         f"({'; '.join(diffs)}). Pass the original base as base_model=, or allow_base_mismatch=True "
                         "if you are sure the weights are compatible")
    if diffs:
        logger.warning("base %s differs from the one %s was trained on: %s", base_dir, adapter_dir, "; ".join(diffs))
    files_by_tensor = tensor_files(base_dir)
    shapes = {n.removesuffix(".weight"): (s[0], s[1]) for n, s in art.safetensors_shapes(base_dir).items()
              if n.endswith(".weight") and len(s) == 2 and n in files_by_tensor}
    recorded = not diffs and (adapter_dir / art.FINGERPRINT_FILE).is_file()  # the very base it was trained on
    adapter_files.check_lora_fits(adapter, shapes, base_dir, complete=recorded)
    if adapter.untrained:  # refused before anything is written (tloen/alpaca-lora#293 exported such adapters)
        raise ModelError(f"the adapter in {adapter_dir} does not change the model's logits at all: it is untrained or "
                         "was saved empty (every lora_B matrix is zero, e.g. saved at step 0); re-run finetune")
    base_config(base_dir)
    has_tokenizer = any((adapter_dir / f).is_file() for f in art.TOKENIZER_FILES)
    template = saved_template(adapter_dir)
    tokenizer = load_tokenizer(adapter_dir if has_tokenizer else base_dir)
    probe = probe_ids(tokenizer, template)  # what the export ships
    token_rows = adapter.token_rows()
    saved = adapter.saved_modules()
    replaced = {n: t for n, t in saved.items() if n in files_by_tensor}  # a tied head is the embedding's copy
    stray = sorted(n for n in saved if n not in files_by_tensor and n != "lm_head.weight") + adapter.other_tensors()
    misfit = [n for n, t in replaced.items()
              if t.dim() != 2 or list(t.shape[1:]) != _stored_shape(files_by_tensor, n)[1:]]
    if stray or misfit:
        raise ModelError(f"the adapter in {adapter_dir} saves whole layers merge() cannot place on {base_dir} "
                         f"({shown(stray or misfit, 120)}); it folds trained embedding and output layers "
                         "of this base only. Merge it with peft's merge_and_unload() instead")
    new_ids = sorted({i for ids, _ in token_rows.values() for i in ids})
    if replaced:  # whole layers trained: the new tokens are the rows past the base's
        rows = {n: _stored_rows(files_by_tensor, n) for n in replaced}
        new_ids = sorted({i for n, t in replaced.items() for i in range(rows[n], t.shape[0])})
    if new_ids:  # new tokens: the probe asks for them too, so the check reads their rows
        if max(new_ids) >= len(tokenizer):
            raise ModelError(f"the adapter in {adapter_dir} trains token id {max(new_ids)}, but its tokenizer has "
                             f"{len(tokenizer)} tokens; the folder's tokenizer is not the one it was trained with")
        probe = torch.cat([probe, torch.tensor(new_ids).expand(probe.shape[0], -1)], dim=1)
    plan = MergePlan(adapter_dir, base_name, base_dir, lora, adapter, template, probe, files_by_tensor,
                     fingerprint_diffs=diffs, token_rows=token_rows, replaced=replaced)
    if token_rows or replaced:
        plan.vocab_size = max(len(tokenizer), *(_stored_rows(files_by_tensor, n) for n in [*token_rows, *replaced]),
                              *(t.shape[0] for t in replaced.values()))
    plan.updates = {f"{m}.weight": (a.float(), b.float(), adapter.scale(m)) for m, (a, b) in adapter.pairs.items()}
    if adapter.config.use_dora:
        prefix, suffix = adapter_files.PEFT_PREFIX, adapter_files.MAGNITUDE_SUFFIX
        plan.magnitudes = {f"{m}.weight": adapter.extra[f"{prefix}{m}{suffix}"].float() for m in adapter.pairs}
    return plan


def saved_template(adapter_dir: Path) -> PromptTemplate:
    """The adapter's saved prompt template (``alpaca`` when it saved none); a damaged one is a ModelError."""
    saved = adapter_dir / art.TEMPLATE_FILE
    if not saved.is_file():
        return get_template("alpaca")
    try:
        return get_template(art.read_json(saved))
    except ConfigError as exc:
        raise ModelError(f"{saved} is not a usable prompt template ({exc}); restore it from the training run") from None


def tensor_files(base_dir: Path) -> dict[str, Path]:
    """Map every tensor of the base checkpoint to its safetensors file (index file or all shards), headers checked."""
    index = base_dir / art.INDEX_FILE
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


def merge_target(merge_into: str, adapter_dir: Path) -> str:
    """Resolve ``merge_into="auto"``: "dequantized" for a LoftQ run, else "original".

    A LoftQ adapter starts as the SVD of the NF4 base's rounding error: it corrects that rounding, so it
    belongs on the rounded weights; on the original ones it would add the error a second time.
    """
    if merge_into != "auto":
        return merge_into
    cfg_file = adapter_dir / art.CONFIG_FILE
    cfg = art.read_json(cfg_file) if cfg_file.is_file() else {}
    return "dequantized" if isinstance(cfg, dict) and cfg.get("init_lora_weights") == "loftq" else "original"


def plan_dequantized(plan: MergePlan) -> None:
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
    recorded = trained_in if trained_in in DTYPES else cfg.get("compute_dtype", "auto")
    if recorded != "auto" and recorded not in DTYPES:
        raise ModelError(f"{cfg_file} records compute_dtype={shown(recorded)}, not a dtype training uses; the file "
                         "is damaged: restore it from the training run, or use merge_into='original'")
    plan.quant_dtype = resolve_compute_dtype(recorded, resolve_device("auto"))
    model = skeleton(plan.base_dir)
    head = model.get_output_embeddings()
    linear = (n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head)
    plan.quantize = {f"{n}.weight" for n in linear}



def _stored_shape(files_by_tensor: dict[str, Path], name: str) -> list[int]:
    """The shape of the base tensor ``name`` as stored (before any new-token rows)."""
    from alpaca_lora.export.safetensors_stream import tensor_metas

    return list(tensor_metas({name: files_by_tensor[name]})[name][0])


def _stored_rows(files_by_tensor: dict[str, Path], name: str) -> int:
    return _stored_shape(files_by_tensor, name)[0]


def _grown(plan: MergePlan, name: str) -> bool:
    """Whether new tokens grow ``name`` (the embedding, an untied output layer) to ``plan.vocab_size`` rows."""
    return bool(plan.vocab_size) and (name in plan.token_rows or name in plan.replaced)


def tensor_shape(plan: MergePlan, name: str, stored: list[int]) -> list[int]:
    """The merged shape of ``name``: as ``stored``, with the grown vocabulary for an embedding of new tokens."""
    return [plan.vocab_size, *stored[1:]] if _grown(plan, name) else list(stored)


def base_tensor(plan: MergePlan, name: str) -> torch.Tensor:
    """The base tensor ``name``: fp32 when floating, rounded through 4-bit first for "dequantized".

    An embedding that new tokens grew gets zero rows up to the grown vocabulary (:func:`merged_tensor`
    fills the trained ones).
    """
    w = read_tensor(plan.base_files, name)
    if not w.is_floating_point():
        return w
    w = _roundtrip_4bit(w, plan) if name in plan.quantize else w.float()
    if _grown(plan, name) and plan.vocab_size > w.shape[0]:
        w = torch.cat([w, w.new_zeros(plan.vocab_size - w.shape[0], *w.shape[1:])])
    return w


def unmerged_tensor(plan: MergePlan, name: str) -> torch.Tensor:
    """The base tensor ``name`` with the adapter's new-token rows or its whole trained layer, no LoRA update.

    What the unmerged (peft) model computes with outside its LoRA layers; the merge check's reference.
    """
    return _tensor(plan, name, with_update=False)


def merged_tensor(plan: MergePlan, name: str) -> torch.Tensor:
    """The base tensor ``name`` plus its LoRA update (computed in fp32), and new-token rows.

    With DoRA each output row is then rescaled to its trained magnitude: ``m / ||W + s B A||_row``
    times ``W + s B A`` (peft's merge, Liu et al. 2024).
    """
    return _tensor(plan, name, with_update=True)


def _tensor(plan: MergePlan, name: str, with_update: bool) -> torch.Tensor:
    if name in plan.replaced:  # a whole trained layer: the base's copy is never read
        return plan.replaced[name].float().clone()
    w = base_tensor(plan, name)
    if with_update and name in plan.updates:
        a, b, scale = plan.updates[name]
        w += scale * (b @ a)  # (out, r) @ (r, in)
        if name in plan.magnitudes:
            w *= (plan.magnitudes[name] / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1)
    if name in plan.token_rows:
        ids, rows = plan.token_rows[name]
        w[torch.tensor(ids)] = rows.to(w.dtype)
    return w


def _roundtrip_4bit(w: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    from alpaca_lora.kernels.bnb_import import import_bitsandbytes

    bnbf = import_bitsandbytes().functional

    q, state = bnbf.quantize_4bit(w.to(plan.quant_dtype).contiguous(), blocksize=64, compress_statistics=True,
                                  quant_type=plan.quant_type, quant_storage=torch.uint8)
    return bnbf.dequantize_4bit(q, state).float()


def base_config(base_dir: Path) -> Any:
    """The base's transformers config, read before the merge writes anything."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{base_dir / 'config.json'} cannot be read as a model config ({type(exc).__name__}: "
                         f"{shown(str(exc))}); the base is damaged: copy or download it again") from None


def probe_ids(tokenizer: Any, template: PromptTemplate) -> torch.Tensor:
    """A fixed (2, T) batch of token ids: an Alpaca prompt and a plain sentence, cut to one length."""
    rows = [tokenizer(t)["input_ids"] for t in (template.render(_PROBE[0]), _PROBE[1])]
    n = min(32, *map(len, rows))
    return torch.tensor([r[:n] for r in rows])
