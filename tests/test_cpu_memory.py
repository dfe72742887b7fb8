"""release_cpu_memory: applied on a Linux glibc CPU run, and only when asked."""

import logging
import platform

import pytest

from alpaca_lora import FinetuneConfig
from alpaca_lora.cpu_memory import release_freed_memory_to_os
from alpaca_lora.train import setup

RECORDS = [{"instruction": "Say hi", "input": "", "output": "hi there"}] * 4
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.fixture(autouse=True)
def _restore_malloc():
    """The setting is process-wide: give later tests glibc's usual ceiling back."""
    from alpaca_lora import cpu_memory

    yield
    cpu_memory._run_threshold.clear()
    cpu_memory._set_mmap_threshold(cpu_memory.MMAP_THRESHOLD_MAX)


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


def test_loading_threshold_is_undone_to_the_runs_own_or_the_ceiling(monkeypatch):
    from alpaca_lora import cpu_memory

    calls: list[int] = []
    monkeypatch.setattr(cpu_memory, "_set_mmap_threshold", lambda t: calls.append(t) or True)
    monkeypatch.setattr(cpu_memory, "_run_threshold", [])
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with cpu_memory.heap_returned_while():
        assert calls == [cpu_memory.MMAP_THRESHOLD_BYTES]
    assert calls[-1] == cpu_memory.MMAP_THRESHOLD_MAX  # glibc's own ceiling, not the low loading value
    cpu_memory.release_freed_memory_to_os(512 * 1024)
    with pytest.raises(RuntimeError), cpu_memory.heap_returned_while():
        raise RuntimeError("loading failed")
    assert calls[-1] == 512 * 1024  # a run that asked for release_cpu_memory keeps its setting


def test_a_threshold_the_user_set_for_the_process_is_left_alone(monkeypatch):
    from alpaca_lora import cpu_memory

    calls: list[int] = []
    monkeypatch.setattr(cpu_memory, "_set_mmap_threshold", lambda t: calls.append(t) or True)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    with cpu_memory.heap_returned_while():
        pass
    assert calls == []
