"""A served workspace for the UI tests: a tiny base, data, a tuned adapter and its merge, and a live server."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from conftest import SHORT_RECORDS

CHROMIUM = Path("/usr/bin/chromium")
FAST = dict(batch_size=4, micro_batch_size=4, learning_rate=2e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0,
            val_set_size=0, warmup_ratio=0.0, cutoff_len=64, gradient_checkpointing=False, quantization=None)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """``ws/``: ``base-tiny/`` (a model folder), ``data.json``, ``tuned/`` (an adapter), ``tuned-merged/``."""
    from alpaca_lora.export.merge import merge
    from alpaca_lora.train.recipe import finetune

    ws = tmp_path_factory.mktemp("ui-ws")
    base = ws / "base-tiny"
    shutil.copytree(tiny_model_dir, base)
    (ws / "data.json").write_text(json.dumps(SHORT_RECORDS * 4), encoding="utf-8")
    (ws / "bad.json").write_text('[{"instruction": "no output field"}]', encoding="utf-8")
    finetune(base, SHORT_RECORDS, ws / "tuned", max_steps=2, **FAST)
    merge(ws / "tuned", ws / "tuned-merged", dtype="float32")
    return ws


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(workspace: Path):
    """The UI over ``workspace``, served on a free loopback port; yields ``(url, page object)``."""
    from alpaca_lora.ui.app import launch

    port = free_port()
    page = launch([workspace], port=port, block=False)
    yield f"http://127.0.0.1:{port}/", page
    page.trainer.stop_all()
    for run in page.trainer.runs.values():
        if run.process is not None:
            try:
                run.process.wait(timeout=60)
            except Exception:
                run.process.kill()
    page.close()
