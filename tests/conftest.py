"""Shared fixtures: a real BPE tokenizer, a tiny random Llama on disk, the shared Alpaca data."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config) -> None:
    """Keep the tests' records and tokenized-data caches out of the user's datasets cache."""
    os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="alpaca-lora-tests-datasets-"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder with the real Alpaca-format data sets (../shared/data beside the checkout)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read real data from ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_records(shared_data: Path) -> list[dict]:
    """1,000 real records: a deterministic mix of GSM8K, GPTeacher roleplay and toolformer."""
    out: list[dict] = []
    for name, n in (("gsm8k_train_alpaca.json", 400), ("gpteacher_roleplay_alpaca.json", 300),
                    ("gpteacher_toolformer_alpaca.json", 300)):
        data = json.loads((shared_data / name).read_text(encoding="utf-8"))
        out.extend(data[:: max(1, len(data) // n)][:n])
    return out


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded default base (SmolLM2-135M-Instruct) as a local folder."""
    from alpaca_lora.model.embedded import default_base_model

    return default_base_model()


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir: Path):
    """SmolLM2's real BPE tokenizer (pad id == EOS id == 2)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


# Short records for quick training tests; test_resilience uses the first six.
SHORT_RECORDS = [
    {"instruction": "Name the color of the sky.", "input": "", "output": "blue"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "What is two plus two?", "input": "", "output": "four"},
    {"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
    {"instruction": "Spell the number.", "input": "7", "output": "seven"},
    {"instruction": "Name a fruit that is yellow.", "input": "", "output": "banana"},
    {"instruction": "Capital of Italy?", "input": "", "output": "Rome"},
    {"instruction": "Repeat the word.", "input": "echo", "output": "echo echo"},
]


def save_tiny_llama(folder: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """Save a tiny random LlamaForCausalLM (2 layers, hidden 64 unless overridden) with ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer) -> Path:
    """A tiny random LlamaForCausalLM (2 layers, hidden 64) saved with SmolLM2's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer) -> Path:
    """Another tiny base (3 layers, other weights): what an adapter or checkpoint was not trained on."""
    return save_tiny_llama(tmp_path_factory.mktemp("other-base"), smol_tokenizer, seed=2,
                           intermediate_size=96, num_hidden_layers=3)


class InputTally:
    """How many hostile inputs a suite tried, by kind; every tally is printed in pytest's summary."""

    every: list[InputTally] = []

    def __init__(self, title: str) -> None:
        self.title, self.counts = title, {}
        InputTally.every.append(self)

    def __call__(self, kind: str) -> None:
        """Count one input of ``kind``."""
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def line(self) -> str:
        """``title: kind: n, ...; total N``."""
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        return f"{self.title}: {kinds}; total {sum(self.counts.values())}"


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the tally of every hostile-input suite that ran."""
    for tally in InputTally.every:
        if tally.counts:
            terminalreporter.write_line(tally.line())


EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil-llama"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def with_custom_code(source: Path, folder: Path, where: str, marker: Path) -> Path:
    """Copy ``source`` to ``folder`` with an ``auto_map`` in ``where`` naming its evil.py (which writes ``marker``)."""
    import shutil

    shutil.copytree(source, folder)
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    data = json.loads((folder / where).read_text()) if (folder / where).is_file() else {}
    if where == "config.json":
        data.update(model_type="evil-llama",
                    auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    else:
        data.update(tokenizer_class="EvilTokenizer", processor_class="EvilTokenizer",
                    auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None], "AutoProcessor": "evil.EvilTokenizer",
                              "AutoImageProcessor": "evil.EvilTokenizer"})
    (folder / where).write_text(json.dumps(data))
    return folder


def lora_training_parts(tiny_model_dir: Path, steps: int = 2):
    """A full-precision tiny Llama with LoRA, AdamW after ``steps`` steps and a LambdaLR scheduler."""
    from alpaca_lora import FinetuneConfig
    from alpaca_lora.model.load import load_model
    from alpaca_lora.model.lora import attach_lora

    model, _ = load_model(tiny_model_dir, None, "float32", device="cpu")
    model = attach_lora(model, FinetuneConfig(lora_r=4, lora_alpha=8, gradient_checkpointing=False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    ids = torch.tensor([[1, 5, 9, 14, 2]])
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler
