"""Importing the package changes nothing outside it: no attention registered with transformers, no libc loaded.

Each check runs in a fresh interpreter, since tests in this process may already have switched a model
to the packed attention or set malloc thresholds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import alpaca_lora

SRC = str(Path(alpaca_lora.__file__).resolve().parents[1])  # the checkout these tests import


def run_fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


IMPORT_EVERY_MODULE = """
import importlib, pkgutil
import alpaca_lora
names = [m.name for m in pkgutil.walk_packages(alpaca_lora.__path__, "alpaca_lora.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
assert "alpaca_lora.kernels.packed_attention" in names and "alpaca_lora.data.packing" in names, names
print(len(names))
"""


def test_importing_every_module_registers_no_attention_with_transformers():
    code = IMPORT_EVERY_MODULE + """
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from alpaca_lora.data.packing import PACKED_ATTENTION, PACKED_EAGER_ATTENTION
for name in (PACKED_ATTENTION, PACKED_EAGER_ATTENTION):
    assert name not in AttentionInterface._global_mapping, "registered at import"
    assert name not in AttentionInterface(), "registered at import"
    assert name not in AttentionMaskInterface._global_mapping, "mask registered at import"
"""
    proc = run_fresh(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 20


def test_registering_happens_when_a_model_is_switched():
    code = """
from transformers import AttentionInterface
from alpaca_lora.data.packing import PACKED_ATTENTION
from alpaca_lora.kernels.packed_attention import packed_sdpa_attention, use_packed_attention

from types import SimpleNamespace

class Model:
    def __init__(self, attn):
        self.config = SimpleNamespace(_attn_implementation=attn)
    def set_attn_implementation(self, name):
        self.config._attn_implementation = name

assert not use_packed_attention(Model("flash_attention_2"))  # neither sdpa nor eager: left alone
assert not use_packed_attention(Model("eager"))  # eager, but its module defines no eager_attention_forward
assert PACKED_ATTENTION not in AttentionInterface()
assert use_packed_attention(Model("sdpa")) and use_packed_attention(Model("sdpa"))  # twice is harmless
assert AttentionInterface()[PACKED_ATTENTION] is packed_sdpa_attention
"""
    proc = run_fresh(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_importing_cpu_memory_loads_no_libc_and_sets_nothing():
    code = """
import alpaca_lora.kernels.cpu_memory as cpu_memory
assert cpu_memory.libc.cache_info().currsize == 0, "libc loaded at import"
assert not any(isinstance(v, (list, dict, set)) for k, v in vars(cpu_memory).items() if not k.startswith("__")), \
    "module-level mutable state"
"""
    proc = run_fresh(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
