"""alpaca_lora: LoRA/QLoRA instruction tuning of Llama-family models on one GPU."""

from alpaca_lora.collator import InstructionCollator
from alpaca_lora.config import FinetuneConfig
from alpaca_lora.data import load_instructions, tokenize_instruction
from alpaca_lora.embedded import default_base_model
from alpaca_lora.errors import (
    AlpacaLoraError,
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    TrainingDiverged,
    TrainingInterrupted,
)
from alpaca_lora.generate import generate
from alpaca_lora.hub import push_to_hub
from alpaca_lora.inspection import InspectionReport, inspect_data
from alpaca_lora.memory import MemoryEstimate, estimate_memory
from alpaca_lora.merge import merge
from alpaca_lora.model import load_model
from alpaca_lora.prompts import PromptTemplate, get_template, list_templates
from alpaca_lora.train import FinetuneResult, finetune

__version__ = "0.1.0"

__all__ = [
    "AlpacaLoraError",
    "CheckpointError",
    "ConfigError",
    "DataError",
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
    "finetune",
    "generate",
    "get_template",
    "inspect_data",
    "list_templates",
    "load_instructions",
    "load_model",
    "merge",
    "push_to_hub",
    "tokenize_instruction",
]
