"""alpaca_lora: LoRA/QLoRA instruction tuning of Llama-family models on one GPU.

The public names below load on first use (PEP 562), so ``import alpaca_lora`` is cheap and imports
neither torch nor transformers; ``from alpaca_lora import finetune`` loads what ``finetune`` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "AlpacaLoraError": "alpaca_lora.errors",
    "CheckpointError": "alpaca_lora.errors",
    "ConfigError": "alpaca_lora.errors",
    "DataError": "alpaca_lora.errors",
    "ModelError": "alpaca_lora.errors",
    "TrainingDiverged": "alpaca_lora.errors",
    "TrainingInterrupted": "alpaca_lora.errors",
    "FinetuneConfig": "alpaca_lora.config",
    "InstructionCollator": "alpaca_lora.data.collator",
    "load_instructions": "alpaca_lora.data.records",
    "tokenize_instruction": "alpaca_lora.data.prepare",
    "tokenize_conversation": "alpaca_lora.data.chat",
    "load_conversations": "alpaca_lora.data.conversations",
    "load_data": "alpaca_lora.data.sources",
    "PromptTemplate": "alpaca_lora.data.prompts",
    "get_template": "alpaca_lora.data.prompts",
    "list_templates": "alpaca_lora.data.prompts",
    "InspectionReport": "alpaca_lora.train.inspection",
    "inspect_data": "alpaca_lora.train.inspection",
    "default_base_model": "alpaca_lora.model.embedded",
    "load_model": "alpaca_lora.model.load",
    "MemoryEstimate": "alpaca_lora.train.memory",
    "estimate_memory": "alpaca_lora.train.memory",
    "FinetuneResult": "alpaca_lora.train.recipe",
    "finetune": "alpaca_lora.train.recipe",
    "merge": "alpaca_lora.export.merge",
    "export_gguf": "alpaca_lora.export.gguf",
    "push_to_hub": "alpaca_lora.export.hub",
    "generate": "alpaca_lora.inference.generate",
    "evaluate": "alpaca_lora.inference.evaluate",
    "EvalReport": "alpaca_lora.inference.evaluate",
    "self_instruct": "alpaca_lora.selfinstruct.pipeline",
}

__all__ = [
    "AlpacaLoraError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EvalReport",
    "FinetuneConfig",
    "FinetuneResult",
    "InspectionReport",
    "InstructionCollator",
    "MemoryEstimate",
    "ModelError",
    "PromptTemplate",
    "TrainingDiverged",
    "TrainingInterrupted",
    "__version__",
    "default_base_model",
    "estimate_memory",
    "evaluate",
    "export_gguf",
    "finetune",
    "generate",
    "get_template",
    "inspect_data",
    "list_templates",
    "load_conversations",
    "load_data",
    "load_instructions",
    "load_model",
    "merge",
    "push_to_hub",
    "self_instruct",
    "tokenize_conversation",
    "tokenize_instruction",
]

if TYPE_CHECKING:
    from alpaca_lora.config import FinetuneConfig
    from alpaca_lora.data.chat import tokenize_conversation
    from alpaca_lora.data.collator import InstructionCollator
    from alpaca_lora.data.conversations import load_conversations
    from alpaca_lora.data.prepare import tokenize_instruction
    from alpaca_lora.data.prompts import PromptTemplate, get_template, list_templates
    from alpaca_lora.data.records import load_instructions
    from alpaca_lora.data.sources import load_data
    from alpaca_lora.errors import (
        AlpacaLoraError,
        CheckpointError,
        ConfigError,
        DataError,
        ModelError,
        TrainingDiverged,
        TrainingInterrupted,
    )
    from alpaca_lora.export.gguf import export_gguf
    from alpaca_lora.export.hub import push_to_hub
    from alpaca_lora.export.merge import merge
    from alpaca_lora.inference.evaluate import EvalReport, evaluate
    from alpaca_lora.inference.generate import generate
    from alpaca_lora.model.embedded import default_base_model
    from alpaca_lora.model.load import load_model
    from alpaca_lora.selfinstruct.pipeline import self_instruct
    from alpaca_lora.train.inspection import InspectionReport, inspect_data
    from alpaca_lora.train.memory import MemoryEstimate, estimate_memory
    from alpaca_lora.train.recipe import FinetuneResult, finetune


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use and keep it in the package namespace."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alpaca_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
