"""Checks and names of the LoRA-variant and new-token fields of :class:`~alpaca_lora.config.FinetuneConfig`.

See ``docs/lora_variants.md``: DoRA, rsLoRA, LoRA+, the ``init_lora_weights`` choices, and new tokens.
"""

from __future__ import annotations

import re
from typing import Any

from alpaca_lora.config_checks import choice_problem, is_choice, number_problem
from alpaca_lora.errors import shown

LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
"""``init_lora_weights`` values; "pissa_niter_N" (N >= 1) is accepted too."""
PISSA_NITER = re.compile(r"pissa_niter_[1-9]\d{0,3}")
NEW_TOKEN_TRAINING = ("rows", "full")
MAX_NEW_TOKENS = 10_000
"""Most tokens ``add_tokens`` or ``special_tokens`` may list."""


def lora_variant_problems(cfg: Any) -> list[str]:
    """Problems of the LoRA variant fields, alone and with the base's quantization or FSDP."""
    p: list[str] = []
    ratio = cfg.loraplus_lr_ratio
    if ratio is not None:
        problem = number_problem("loraplus_lr_ratio", ratio, lambda v: 0 < v <= 1e6, "in (0, 1e6]")
        p.append(problem and f"{problem}, or None (LoRA+ off); the LoRA+ paper uses 16")
    init = cfg.init_lora_weights
    if not (is_choice(init, LORA_INITS) or (isinstance(init, str) and PISSA_NITER.fullmatch(init))):
        return [x for x in p if x] + [choice_problem("init_lora_weights", init, LORA_INITS)
                                      + " (or 'pissa_niter_N', e.g. 'pissa_niter_4')"]
    if init == "loftq" and cfg.quantization != "nf4":
        p.append(f"init_lora_weights='loftq' with quantization={shown(cfg.quantization)}: LoftQ fits the "
                 "adapter to the NF4 base's quantization error; use quantization='nf4', or another "
                 "init_lora_weights")
    if init not in ("default", "gaussian", "loftq") and cfg.quantization == "int8":
        p.append(f"init_lora_weights={init!r} with quantization='int8': the residual base cannot be stored "
                 "in 8 bits here; use quantization='nf4' or None")
    if cfg.fsdp is True:
        used = [name for name, on in (("use_dora=True", cfg.use_dora is True),
                                      ("loraplus_lr_ratio", ratio is not None),
                                      (f"init_lora_weights={init!r}", init not in ("default", "gaussian")))
                if on]
        if used:
            p.append(f"fsdp=True with {', '.join(used)}: FSDP's flat parameters hold neither the per-matrix "
                     "groups nor the changed base these need; run them with fsdp=False")
    return [x for x in p if x]


def new_token_problems(cfg: Any) -> list[str]:
    """Problems of ``add_tokens``, ``special_tokens`` and ``new_token_training``."""
    p: list[str] = []
    seen: set[str] = set()
    for name in ("add_tokens", "special_tokens"):
        value = getattr(cfg, name)
        if value is None:
            continue
        if not (isinstance(value, list) and 0 < len(value) <= MAX_NEW_TOKENS
                and all(isinstance(t, str) and t.strip() and len(t) <= 200 for t in value)):
            p.append(f"{name}={shown(value)}: must be None or a list of 1 to {MAX_NEW_TOKENS} non-blank "
                     "strings of at most 200 characters, e.g. ['<|tool|>']")
            continue
        twice = sorted({t for t in value if t in seen or value.count(t) > 1})
        if twice:
            p.append(f"{name}: {shown(twice)} given more than once (across add_tokens and special_tokens); "
                     "list each new token once")
        seen.update(value)
    if cfg.new_token_training not in NEW_TOKEN_TRAINING:
        p.append(choice_problem("new_token_training", cfg.new_token_training, NEW_TOKEN_TRAINING))
    elif cfg.new_token_training != "rows" and cfg.add_tokens is None and cfg.special_tokens is None:
        p.append(f"new_token_training={cfg.new_token_training!r} without add_tokens or special_tokens: there are "
                 "no new tokens to train; add them, or leave new_token_training='rows'")
    if seen and cfg.fsdp is True:
        p.append("fsdp=True with add_tokens / special_tokens: the new rows train as peft trainable tokens or "
                 "modules_to_save, which FSDP's flat parameters cannot hold; run with fsdp=False")
    return p


def lora_variants(fields: dict[str, Any]) -> list[str]:
    """The LoRA variants a run's settings turn on, as short names (``["DoRA", "LoRA+ x16", "init pissa"]``).

    Args:
        fields: ``FinetuneConfig.to_dict()``, or a saved ``finetune_config.json`` (missing keys are off).

    """
    ratio, init = fields.get("loraplus_lr_ratio"), fields.get("init_lora_weights", "default")
    named = (("DoRA", fields.get("use_dora") is True), ("rsLoRA", fields.get("use_rslora") is True),
             (f"LoRA+ x{ratio:g}" if isinstance(ratio, (int, float)) else "LoRA+", ratio is not None),
             (f"init {init}", init not in ("default", None, True)))
    return [name for name, on in named if on]
