"""alpaca_lora: LoRA/QLoRA instruction tuning of Llama-family models on one GPU."""

from alpaca_lora.config import FinetuneConfig
from alpaca_lora.embedded import default_base_model
from alpaca_lora.errors import AlpacaLoraError, CheckpointError, ConfigError, DataError, ModelError
from alpaca_lora.prompts import PromptTemplate, get_template, list_templates

__version__ = "0.1.0"

__all__ = [
    "AlpacaLoraError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FinetuneConfig",
    "ModelError",
    "PromptTemplate",
    "__version__",
    "default_base_model",
    "get_template",
    "list_templates",
]
