"""The settings form of the Train tab: the main ``FinetuneConfig`` fields with their defaults and docs.

Each field's input shows the field's own docstring (the one ``alpaca-lora finetune --help`` prints), and
the values are checked by ``FinetuneConfig`` itself before a run starts, so the form accepts exactly what
the command does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from alpaca_lora.config import FinetuneConfig
from alpaca_lora.config_file import field_docs

FIELDS = ("num_epochs", "max_steps", "learning_rate", "batch_size", "micro_batch_size", "cutoff_len",
          "val_set_size", "lora_r", "lora_alpha", "lora_dropout", "template", "quantization", "compute_dtype",
          "train_on_inputs", "logging_steps", "eval_steps", "save_steps", "seed")
"""The fields shown, in order (the rest keep their defaults, or come from a ``--config`` file of the run)."""
QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_OPTIONAL_INTS = {"max_steps", "eval_steps", "save_steps"}


def defaults() -> dict[str, Any]:
    """The default of every field of :data:`FIELDS`."""
    cfg = FinetuneConfig()
    return {name: getattr(cfg, name) for name in FIELDS}


def docs() -> dict[str, str]:
    """The docstring of every field of :data:`FIELDS` (backticks dropped, as the help shows them)."""
    every = field_docs(FinetuneConfig)
    return {name: every.get(name, "").replace("``", "") for name in FIELDS}


def components_for(names: list[str]) -> list[Any]:
    """One Gradio input per field in ``names`` (of :data:`FIELDS`), created inside the current layout."""
    import gradio as gr

    values, info = defaults(), docs()
    out = []
    for name in names:
        value = values[name]
        if name == "quantization":
            out.append(gr.Dropdown(list(QUANTIZATIONS), value=value or "none", label=name, info=info[name],
                                   elem_id=f"train-{name}"))
        elif name == "compute_dtype":
            out.append(gr.Dropdown(list(COMPUTE_DTYPES), value=value, label=name, info=info[name],
                                   elem_id=f"train-{name}"))
        elif isinstance(value, bool):
            out.append(gr.Checkbox(value, label=name, info=info[name], elem_id=f"train-{name}"))
        elif name in _OPTIONAL_INTS or isinstance(value, (int, float)):
            out.append(gr.Number(value, label=name, info=info[name] + (" Empty or 0: None." if value is None else ""),
                                 precision=0 if name in _OPTIONAL_INTS or isinstance(value, int) else None,
                                 elem_id=f"train-{name}"))
        else:
            out.append(gr.Textbox(str(value), label=name, info=info[name], elem_id=f"train-{name}"))
    return out


def settings(values: list[Any]) -> dict[str, Any]:
    """The form's values (in :data:`FIELDS` order) as FinetuneConfig fields, checked by FinetuneConfig.

    Raises:
        ConfigError: A value FinetuneConfig refuses (every problem, each naming its field).

    """
    base = defaults()
    out: dict[str, Any] = {}
    for name, value in zip(FIELDS, values, strict=True):
        default = base[name]
        if name == "quantization":
            out[name] = None if value in (None, "", "none") else value
        elif value is None or value == "" or (name in _OPTIONAL_INTS and value == 0):  # a cleared number reads 0
            out[name] = None if name in _OPTIONAL_INTS else default
        elif name in _OPTIONAL_INTS or (isinstance(default, int) and not isinstance(default, bool)):
            number = float(value)
            out[name] = int(number) if number.is_integer() else number  # FinetuneConfig names a fraction's field
        elif isinstance(default, float):
            out[name] = float(value)
        else:
            out[name] = value
    FinetuneConfig(**out)  # raises ConfigError listing every problem
    return out


def config_rows(config: dict[str, Any]) -> list[list[Any]]:
    """``[field, value, default]`` rows of a run's config (the fields that differ from the defaults first)."""
    base = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)
            if f.default is not dataclasses.MISSING}
    rows = [[k, _text(v), _text(base.get(k))] for k, v in config.items()]
    return sorted(rows, key=lambda r: r[1] == r[2])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)

