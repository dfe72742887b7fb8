"""release_cpu_memory: applied on a Linux glibc CPU run, and only when asked."""

import logging
import platform

import pytest

from alpaca_lora import FinetuneConfig
from alpaca_lora.kernels.cpu_memory import release_freed_memory_to_os
from alpaca_lora.train.setup import setup

RECORDS = [{"instruction": "Say hi", "input": "", "output": "hi there"}] * 4
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.fixture(autouse=True)
def _restore_malloc():
    """The setting is process-wide: give later tests glibc's usual ceiling back."""
    from alpaca_lora.kernels import cpu_memory as cpu_memory

    yield
    cpu_memory.restore_memory_settings()


def test_applies_on_glibc_and_reports_it():
    assert release_freed_memory_to_os() is GLIBC


@pytest.mark.parametrize("flag", [True, False])
def test_setup_applies_it_only_when_configured(tiny_model_dir, tmp_path, caplog, flag):
    caplog.set_level(logging.INFO, logger="alpaca_lora.kernels.cpu_memory")
    cfg = FinetuneConfig(val_set_size=0, max_steps=1, cutoff_len=96, release_cpu_memory=flag, device="cpu")
    run = setup(tiny_model_dir, RECORDS, tmp_path, cfg)
    run.metrics.close()
    applied = any("returned to the OS" in r.getMessage() for r in caplog.records)
    assert applied is (flag and GLIBC)


def test_loading_threshold_is_undone_to_the_ceiling_and_a_run_sets_its_own_after(monkeypatch):
    from alpaca_lora.kernels import cpu_memory as cpu_memory

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(cpu_memory, "_mallopt", lambda p, v: calls.append((p, v)) or True)
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(var, raising=False)
    with cpu_memory.heap_returned_while():
        assert calls == [(cpu_memory.M_MMAP_THRESHOLD, cpu_memory.MMAP_THRESHOLD_BYTES)]
    # glibc's own ceiling, not the low loading value, and a trim threshold that keeps the step's heap
    assert calls[1:] == [(cpu_memory.M_MMAP_THRESHOLD, cpu_memory.MMAP_THRESHOLD_MAX),
                         (cpu_memory.M_TRIM_THRESHOLD, cpu_memory.TRIM_THRESHOLD_MAX)]
    calls.clear()
    with pytest.raises(RuntimeError), cpu_memory.heap_returned_while():
        raise RuntimeError("loading failed")
    assert calls[1:] == [(cpu_memory.M_MMAP_THRESHOLD, cpu_memory.MMAP_THRESHOLD_MAX),
                         (cpu_memory.M_TRIM_THRESHOLD, cpu_memory.TRIM_THRESHOLD_MAX)]
    calls.clear()
    cpu_memory.release_freed_memory_to_os(512 * 1024)  # a release_cpu_memory run, after loading
    assert calls == [(cpu_memory.M_MMAP_THRESHOLD, 512 * 1024)]  # the trim threshold is not touched
    assert cpu_memory.restore_memory_settings()
    assert calls[1:] == [(cpu_memory.M_MMAP_THRESHOLD, cpu_memory.MMAP_THRESHOLD_MAX),
                         (cpu_memory.M_TRIM_THRESHOLD, cpu_memory.TRIM_THRESHOLD_MAX)]


def test_a_trim_threshold_the_user_set_is_left_alone(monkeypatch):
    from alpaca_lora.kernels import cpu_memory as cpu_memory

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(cpu_memory, "_mallopt", lambda p, v: calls.append((p, v)) or True)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    with cpu_memory.heap_returned_while():
        pass
    assert [p for p, _ in calls] == [cpu_memory.M_MMAP_THRESHOLD] * 2


def test_a_threshold_the_user_set_for_the_process_is_left_alone(monkeypatch):
    from alpaca_lora.kernels import cpu_memory as cpu_memory

    calls: list[int] = []
    monkeypatch.setattr(cpu_memory, "_mallopt", lambda p, v: calls.append(v) or True)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    with cpu_memory.heap_returned_while():
        pass
    assert calls == []
