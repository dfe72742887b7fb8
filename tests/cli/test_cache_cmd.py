"""alpaca-lora cache lists the tokenized tables a run left and clears them."""

from __future__ import annotations

from alpaca_lora.cli.main import main
from alpaca_lora.config import FinetuneConfig
from alpaca_lora.data.token_cache import list_cache
from alpaca_lora.train.setup import setup

RECORDS = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in "red blue green cat dog sun".split()]


def test_cache_lists_and_clears_what_a_run_left(tiny_model_dir, tmp_path, capsys):
    cfg = FinetuneConfig(cutoff_len=64, val_set_size=0, quantization=None, data_cache_dir=str(tmp_path / "c"))
    setup(tiny_model_dir, RECORDS, tmp_path / "out", cfg)
    capsys.readouterr()
    assert main(["cache", "--dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    (entry,) = list_cache(tmp_path / "c" / "tokenized")
    assert entry.path.name in out and "6 records" in out and "alpaca, alpaca, cutoff 64" in out and "1 entry" in out
    assert main(["cache", "--dir", str(tmp_path / "c"), "--clear"]) == 0
    assert "removed 1 entry" in capsys.readouterr().out and list_cache(tmp_path / "c" / "tokenized") == []
    assert main(["cache", "--dir", str(tmp_path / "c")]) == 0 and "0 entries" in capsys.readouterr().out
