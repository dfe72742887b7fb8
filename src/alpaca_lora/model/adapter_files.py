"""Read a LoRA adapter folder's files back and check them before peft or a merge uses them.

The config must describe a LoRA adapter peft accepts, the weights file must hold exactly the lora_A /
lora_B pairs (of the config's ranks, for the modules it targets) and finite values; a damaged or
mismatched adapter is an error naming the file and the fix, never a silently skipped tensor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alpaca_lora.errors import AlpacaLoraError, ModelError, shown
from alpaca_lora.files import load_safetensors, non_finite, read_json, safetensors_header

LORA_DTYPES = ("F32", "F16", "BF16", "F64")
"""Safetensors dtypes a LoRA adapter's tensors may have (a merge computes in fp32 from any of them)."""
PEFT_PREFIX = "base_model.model."
TOKEN_ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
"""Saved key ending of the new-token rows of an embedding (peft's trainable tokens)."""
"""Prefix of every tensor name in a peft adapter file; peft silently skips a tensor without it."""
_FIX_CONFIG = "the file is damaged or was edited: restore it from the run that wrote the adapter (or re-run finetune)"
_FIX_PAIR = ("the config and the weights do not belong together: copy adapter_config.json and "
             "adapter_model.safetensors from the same run, or re-run finetune")
_LORA_A_B = re.compile(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight")


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        return False


def _is_regex(value: Any) -> bool:
    try:
        re.compile(value)
    except (re.error, TypeError, ValueError, RecursionError, OverflowError):
        return False
    return isinstance(value, str) and bool(value)


def _are_names(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def _is_pattern_map(value: Any, ok: Any) -> bool:
    # peft matches each key as rf"(.*\.)?({key})$", so the key must compile inside that pattern too
    return isinstance(value, dict) and all(_is_regex(k) and _is_regex(rf"(.*\.)?({k})$") and ok(v)
                                           for k, v in value.items())


_LORA_FIELDS: dict[str, tuple[Any, str]] = {
    "r": (lambda v: _is_int(v, 1), "an int >= 1"),
    "lora_alpha": (_is_number, "a finite number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "target_modules": (lambda v: _are_names(v) or _is_regex(v), "a list of module names or a regular expression"),
    "rank_pattern": (lambda v: _is_pattern_map(v, lambda r: _is_int(r, 1)), "an object of regex: int >= 1"),
    "alpha_pattern": (lambda v: _is_pattern_map(v, _is_number), "an object of regex: finite number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
    "modules_to_save": (lambda v: v is None or _are_names(v), "null or a list of module names"),
    "exclude_modules": (lambda v: v is None or _are_names(v) or _is_regex(v), "null, names or a regular expression"),
    "layers_to_transform": (lambda v: v is None or _is_int(v, 0) or (isinstance(v, list) and all(
        _is_int(i, 0) for i in v)), "null, an int >= 0 or a list of them"),
    "layers_pattern": (lambda v: v is None or (isinstance(v, str) and _is_regex(v)) or _are_names(v),
                       "null, a name or a list of names"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or an initialisation name"),
    "alora_invocation_tokens": (lambda v: v is None or (isinstance(v, list) and bool(v) and all(
        _is_int(t, 0) for t in v)), "null or a list of token ids"),
    "megatron_config": (lambda v: v is None, "null: alpaca_lora applies adapters to transformers models, not "
                        "Megatron ones"),
    "layer_replication": (lambda v: v is None or (isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 2 and _is_int(p[0], 0) and _is_int(p[1], 1) and p[0] < p[1] for p in v)),
        "null or a list of [start, end) layer ranges"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "revision": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "task_type": (lambda v: v is None or isinstance(v, str), "null or a string"),
}
"""The adapter_config.json fields a LoRA load or merge depends on, with the values they may take."""


@dataclass
class LoraAdapter:
    """A LoRA adapter read back and checked by :func:`read_lora_adapter`.

    Attributes:
        config_file: Its ``adapter_config.json``.
        weights_file: Its ``adapter_model.safetensors``.
        config: The config as peft reads it (a ``peft.LoraConfig``).
        pairs: Module name in the base model (``model.layers.0.self_attn.q_proj``) -> ``(A, B)``, A of
            shape (r, in) and B of shape (out, r).
        extra: Tensors of features beyond plain LoRA that the config declares (DoRA magnitudes,
            ``modules_to_save`` copies, trained biases), by file name.

    """

    config_file: Path
    weights_file: Path
    config: Any
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def token_rows(self) -> dict[str, tuple[list[int], torch.Tensor]]:
        """New-token rows by embedding weight name (``model.embed_tokens.weight``): ``(ids, rows)``.

        Raises:
            ModelError: The config lists no ids for a saved set of rows, or as many ids as it has rows.

        """
        indices = self.config.trainable_token_indices
        out = {}
        for key, rows in self.extra.items():
            if not key.endswith(TOKEN_ROWS_SUFFIX):
                continue
            module = key.removeprefix(PEFT_PREFIX).removesuffix(TOKEN_ROWS_SUFFIX)
            ids = indices.get(module.rsplit(".", 1)[-1]) if isinstance(indices, dict) else indices
            if not isinstance(ids, list) or len(ids) != rows.shape[0] or rows.dim() != 2:
                raise ModelError(f"{self.weights_file}: the new-token rows of {module} ({list(rows.shape)}) do not "
                                 f"match trainable_token_indices={shown(indices, 80)} of {self.config_file}; the "
                                 "adapter is damaged: re-run finetune")
            out[f"{module}.weight"] = (list(ids), rows)
        return out

    def saved_modules(self) -> dict[str, torch.Tensor]:
        """Whole layers the adapter trained (``modules_to_save``), by weight name (``model.embed_tokens.weight``)."""
        saved = list(self.config.modules_to_save or [])
        if saved and getattr(self.config, "ensure_weight_tying", False):
            saved.append("lm_head")  # the tied output layer, saved beside the embedding
        return {key.removeprefix(PEFT_PREFIX): t for key, t in self.extra.items()
                if key.endswith(".weight") and key.removeprefix(PEFT_PREFIX).removesuffix(".weight").rsplit(".", 1)[-1]
                in saved}

    def other_tensors(self) -> list[str]:
        """Declared tensors that are no DoRA magnitude, new-token rows or whole saved layer (trained biases, say)."""
        saved = {PEFT_PREFIX + n for n in self.saved_modules()}
        return sorted(k for k in self.extra if not k.endswith((MAGNITUDE_SUFFIX, TOKEN_ROWS_SUFFIX)) and k not in saved)

    def scale(self, module: str) -> float:
        """LoRA scaling of ``module``: alpha / r (Hu et al. 2021), alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        rank = self.pairs[module][0].shape[0]
        alpha = float(_pattern_value(self.config.alpha_pattern, module, self.config.lora_alpha))
        return alpha / rank**0.5 if self.config.use_rslora else alpha / rank

    @property
    def untrained(self) -> bool:
        """True when the adapter changes nothing: every update ``B @ A`` is zero (lora_B starts at zero)."""
        return not self.extra and all(not a.any() or not b.any() for a, b in self.pairs.values())


def read_lora_adapter(config_file: str | Path, weights_file: str | Path, *,
                      error: type[AlpacaLoraError] = ModelError) -> LoraAdapter:
    """Read and check a LoRA adapter before peft or a merge uses it.

    Checked, each failure an ``error`` naming the file and the fix: the config is a JSON object describing
    a LoRA adapter, with fields of the right types, that peft accepts; the weights file's header is
    intact; every tensor is a floating-point lora_A or lora_B matrix (or a tensor of a feature the config
    declares) with its partner, of the rank ``r`` (or ``rank_pattern``) gives, for a module
    ``target_modules`` selects; and no value is NaN or infinite (training diverged).

    Args:
        config_file: The ``adapter_config.json``.
        weights_file: The ``adapter_model.safetensors``.
        error: The error class raised.

    Returns:
        The checked adapter; see :func:`check_lora_fits` for the check against a base model.

    """
    config_file, weights_file = Path(config_file), Path(weights_file)
    config = _lora_config(read_json(config_file, error=error, fix=_FIX_CONFIG), config_file, error)
    header, _ = safetensors_header(weights_file, error=error)
    odd = {n: m["dtype"] for n, m in header.items() if n != "__metadata__" and m["dtype"] not in LORA_DTYPES}
    if odd:
        raise error(f"{weights_file} holds tensors of dtypes LoRA weights never have: {shown(odd)}; LoRA matrices are "
                    f"floating point ({', '.join(LORA_DTYPES)}). The file is damaged or not a LoRA adapter: "
                    "write it again (finetune, or peft's save_pretrained)")
    tensors = load_safetensors(weights_file, error=error)
    bad = non_finite(tensors)
    if bad:
        raise error(f"{weights_file} holds NaN or infinite values in {len(bad)} of its {len(tensors)} tensors "
                    f"({shown(sorted(bad)[:3])}{' ...' if len(bad) > 3 else ''}): training diverged before this "
                    "adapter was saved, and it would answer with empty or garbage text. Retrain with a lower "
                    "learning_rate, or use the last good checkpoint-N/ folder of the run")
    pairs, extra = _lora_tensors(tensors, config, weights_file, error)
    _check_ranks_and_targets(pairs, config, config_file, weights_file, error)
    return LoraAdapter(config_file, weights_file, config, pairs, extra)


def check_lora_fits(adapter: LoraAdapter, linear_shapes: dict[str, tuple[int, int]], base: str | Path, *,
                    complete: bool = True, error: type[AlpacaLoraError] = ModelError) -> None:
    """Check that ``adapter`` fits a base model whose linear layers have ``linear_shapes``.

    Args:
        adapter: From :func:`read_lora_adapter`.
        linear_shapes: Module name -> ``(out_features, in_features)`` of the base's linear layers.
        base: The base, for messages.
        complete: The base is the one the adapter was trained on, so every module its
            ``target_modules`` select must have weights (False for another base, e.g. a deeper one).
        error: The error class raised.

    Raises:
        AlpacaLoraError: Of class ``error`` when the adapter updates a module the base lacks, a module of
            another shape, or (``complete``) holds no weights for a base module its ``target_modules``
            select (peft would add it untrained: the file is incomplete).

    """
    missing = sorted(m for m in adapter.pairs if m not in linear_shapes)
    if missing:
        raise error(f"{adapter.weights_file} updates {len(missing)} modules the base {base} does not have "
                    f"({shown(missing[:3])}); pass the base model the adapter was trained on (base_model=)")
    wrong = [f"{m} is {list(linear_shapes[m])} in the base, [{b.shape[0]}, {a.shape[1]}] in the adapter"
             for m, (a, b) in sorted(adapter.pairs.items()) if (b.shape[0], a.shape[1]) != tuple(linear_shapes[m])]
    if wrong:
        raise error(f"the adapter {adapter.weights_file} does not fit the base {base}: {shown(wrong[:2], 300)}"
                    f"{f' and {len(wrong) - 2} more' if len(wrong) > 2 else ''}; pass the base model the adapter "
                    "was trained on (base_model=)")
    if not complete or adapter.config.target_modules == "all-linear":
        return
    unfilled = sorted(m for m in linear_shapes if m not in adapter.pairs and _targeted(adapter, m, error))
    if unfilled:
        raise error(f"target_modules={shown(_targets(adapter.config))} of {adapter.config_file} selects "
                    f"{len(unfilled)} modules of the base {base} that {adapter.weights_file} holds no weights for "
                    f"({shown(unfilled[:3])}): the weights file is incomplete, or {_FIX_PAIR}")


def _lora_config(raw: dict[str, Any], file: Path, error: type[AlpacaLoraError]) -> Any:
    """The checked fields of ``raw`` as a ``peft.LoraConfig``."""
    if raw.get("peft_type") != "LORA":
        raise error(f"{file} describes a {shown(raw.get('peft_type'), 40)} adapter (peft_type), not a LoRA one: "
                    f"alpaca_lora reads LoRA adapters only. If this is one of its runs, {_FIX_CONFIG}")
    problems = [f"{name}={shown(raw[name], 60)}: must be {what}"
                for name, (ok, what) in _LORA_FIELDS.items() if name in raw and not ok(raw[name])]
    if raw.get("target_modules") is None:
        problems.append("target_modules is missing: it names the modules the adapter updates")
    if problems:
        raise error(f"{file} is not a usable LoRA config:\n  - " + "\n  - ".join(problems) + f"\n{_FIX_CONFIG}")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
        raise error(f"{file} is the raw form of an init_lora_weights={init!r} adapter (a checkpoint of such a run): "
                    "it adds to the residual base training kept, not to the base model. Use the run's output "
                    "folder, whose adapter finetune() converted to a plain LoRA on the base, or resume the run to "
                    "its end")
    from peft import LoraConfig

    try:  # peft's own checks of the fields above and of everything else it reads
        return LoraConfig.from_peft_type(**raw)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, re.error) as exc:  # RecursionError too
        raise error(f"peft refuses {file} ({type(exc).__name__}: {shown(str(exc))}); {_FIX_CONFIG}") from None


def _lora_tensors(tensors: dict[str, torch.Tensor], config: Any, file: Path,
                  error: type[AlpacaLoraError]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Pair each lora_A with its lora_B by module; keep the tensors of declared features; refuse the rest."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for name, t in tensors.items():
        m = _LORA_A_B.fullmatch(name)
        if m:
            halves.setdefault(m.group(1), {})[m.group(2)] = t
        else:
            others.append(name)
    extra = {n: tensors[n] for n in others if _declared(n, config, halves)}
    unknown = sorted(n for n in others if n not in extra)
    if unknown:
        raise error(f"{file} holds {len(unknown)} tensors that are not LoRA A/B matrices of this config "
                    f"({shown(unknown[:3])}): peft would silently skip them. The file is damaged or belongs to "
                    f"another adapter; {_FIX_PAIR}")
    if not halves:
        raise error(f"{file} holds no LoRA weights: the adapter is empty (saved before training, or by a broken "
                    "save, tloen/alpaca-lora#293); re-run finetune")
    pairs = {}
    for module, half in sorted(halves.items()):
        a, b = half.get("A"), half.get("B")
        if a is None or b is None:
            raise error(f"{file} holds lora_{'A' if b is None else 'B'} for {module} but not its partner "
                        f"lora_{'B' if b is None else 'A'}; the file is damaged: write it again or re-run finetune")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise error(f"{file}: the LoRA matrices of {module} have the shapes A {list(a.shape)} and B "
                        f"{list(b.shape)}, not (r, in) and (out, r) of one rank r >= 1; the file is damaged: "
                        "write it again or re-run finetune")
        pairs[module] = (a, b)
    return pairs, extra


def _declared(name: str, config: Any, halves: dict[str, Any]) -> bool:
    """Whether a tensor that is no lora_A/lora_B belongs to a feature the config declares."""
    if not name.startswith(PEFT_PREFIX):
        return False
    path = name.removeprefix(PEFT_PREFIX)
    if config.use_dora and path.endswith(MAGNITUDE_SUFFIX):
        return path.removesuffix(MAGNITUDE_SUFFIX) in halves
    if config.bias != "none" and path.endswith(".bias"):
        return True
    if config.trainable_token_indices and path.endswith(TOKEN_ROWS_SUFFIX):
        return True
    if config.modules_to_save and getattr(config, "ensure_weight_tying", False) and path == "lm_head.weight":
        return True  # the tied output layer, saved beside the embedding it shares
    saved = config.modules_to_save or []
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in saved)


def _check_ranks_and_targets(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], config: Any, config_file: Path,
                             weights_file: Path, error: type[AlpacaLoraError]) -> None:
    wrong = [f"{m}: rank {a.shape[0]}, config {_pattern_value(config.rank_pattern, m, config.r)}"
             for m, (a, _) in pairs.items() if a.shape[0] != _pattern_value(config.rank_pattern, m, config.r)]
    if wrong:
        raise error(f"the ranks of {weights_file} do not match r={config.r}"
                    f"{f' / rank_pattern={shown(config.rank_pattern, 80)}' if config.rank_pattern else ''} of "
                    f"{config_file} ({shown(wrong[:2], 200)}{' ...' if len(wrong) > 2 else ''}); {_FIX_PAIR}")
    if config.target_modules == "all-linear":
        return
    adapter = LoraAdapter(config_file, weights_file, config, pairs)
    stray = sorted(m for m in pairs if not _targeted(adapter, m, error))
    if stray:
        raise error(f"{weights_file} holds weights for {len(stray)} modules that target_modules="
                    f"{shown(_targets(config))} of {config_file} does not select ({shown(stray[:3])}): peft would "
                    f"silently skip them; {_FIX_PAIR}")


def _targeted(adapter: LoraAdapter, module: str, error: type[AlpacaLoraError]) -> bool:
    """Whether peft would put a LoRA layer on ``module`` (its own matching: names, regex, excludes, layers)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    try:
        return bool(check_target_module_exists(adapter.config, module))
    except (TypeError, ValueError, re.error) as exc:
        raise error(f"peft cannot match the modules of {adapter.config_file} ({type(exc).__name__}: "
                    f"{shown(str(exc))}); {_FIX_CONFIG}") from None


def _targets(config: Any) -> Any:
    targets = config.target_modules
    return sorted(targets) if isinstance(targets, (set, list, tuple)) else targets


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """The rule of peft for rank_pattern / alpha_pattern: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
