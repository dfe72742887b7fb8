"""release_cpu_memory: applied on a Linux glibc CPU run, and only when asked."""

import logging
import platform

import pytest

from alpaca_lora import FinetuneConfig
from alpaca_lora.cpu_memory import release_freed_memory_to_os
from alpaca_lora.train import setup

RECORDS = [{"instruction": "Say hi", "input": "", "output": "hi there"}] * 4
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_applies_on_glibc_and_reports_it():
    assert release_freed_memory_to_os() is GLIBC


@pytest.mark.parametrize("flag", [True, False])
def test_setup_applies_it_only_when_configured(tiny_model_dir, tmp_path, caplog, flag):
    caplog.set_level(logging.INFO, logger="alpaca_lora.cpu_memory")
    cfg = FinetuneConfig(val_set_size=0, max_steps=1, cutoff_len=96, release_cpu_memory=flag, device="cpu")
    run = setup(tiny_model_dir, RECORDS, tmp_path, cfg)
    run.metrics.close()
    applied = any("returned to the OS" in r.getMessage() for r in caplog.records)
    assert applied is (flag and GLIBC)
