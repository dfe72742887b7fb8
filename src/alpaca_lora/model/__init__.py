"""The base model: check its folder, load it (4-bit NF4 by default) with its tokenizer, attach LoRA."""
