"""The learning-rate schedule: linear warm-up, then linear decay to 0, cosine decay to 0 or constant.

The expected values are computed here from the formulas, not by calling the package's schedule:

* ``warmup = int(warmup_ratio * total_steps)`` optimizer steps of warm-up (rounded down);
* warm-up is linear from 0: optimizer step ``i < warmup`` (0-based) runs at ``peak * (i + 1) / (warmup + 1)``,
  so the ramp's zero is the step before the first one and no step is spent at lr 0;
* then, with ``progress = (i - warmup) / max(1, total_steps - warmup)``: "linear" runs at
  ``peak * (1 - progress)``, "cosine" at ``peak * (1 + cos(pi * progress)) / 2`` and "constant" at ``peak``.

``metrics.jsonl`` logs, at step ``s`` (1-based, after ``s`` updates), the scheduler's lr after its
``s``-th step: the lr of the next update (0-based index ``s``), 0 after the last one for linear and cosine.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from alpaca_lora import FinetuneConfig
from alpaca_lora.train.optim import build_optimizer
from alpaca_lora.train.recipe import finetune
from conftest import SHORT_RECORDS

SCHEDULERS = ("linear", "cosine", "constant")


def expected_lr(kind: str, peak: float, step: int, warmup: int, total: int) -> float:
    """The lr of 0-based optimizer step ``step``, from the formulas in the module docstring."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if kind == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (1.0 - progress)


def schedule(kind: str, peak: float, warmup_ratio: float, total: int) -> list[float]:
    """The lr of optimizer steps 0..total (the last one is what is left after the final update)."""
    cfg = FinetuneConfig(learning_rate=peak, warmup_ratio=warmup_ratio, lr_scheduler=kind)
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = build_optimizer(cfg, [weight], total)
    lrs = []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    return lrs


def same(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=1e-12, abs=1e-15)


# (total_steps, warmup_ratio, the warm-up steps that ratio gives)
CASES = [(10, 0.2, 2), (100, 0.03, 3), (7, 0.3, 2), (10, 0.25, 2), (8, 0.0, 0), (2, 0.5, 1), (1, 0.0, 0),
         (1, 0.5, 0), (1, 0.99, 0)]


@pytest.mark.parametrize("kind", SCHEDULERS)
@pytest.mark.parametrize(("total", "ratio", "warmup"), CASES)
def test_schedule_follows_the_formulas_at_every_step(kind, total, ratio, warmup):
    peak = 3e-4
    lrs = schedule(kind, peak, ratio, total)
    expected = [expected_lr(kind, peak, i, warmup, total) for i in range(total + 1)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # the fixed points: step 0, end of warm-up (the first step at the peak), midway, last, after the last
    first = peak / (warmup + 1)
    assert same(lrs[0], first)
    assert same(lrs[warmup], peak)
    decay = total - warmup  # steps from the end of warm-up to the end (>= 1: warmup_ratio < 1)
    last = {"linear": peak / decay, "cosine": peak * 0.5 * (1.0 - math.cos(math.pi / decay)), "constant": peak}
    assert same(lrs[total - 1], last[kind])
    assert same(lrs[total], peak if kind == "constant" else 0.0)
    if total - warmup >= 2 and (total - warmup) % 2 == 0:
        mid = warmup + (total - warmup) // 2
        assert same(lrs[mid], peak if kind == "constant" else peak / 2)  # cos(pi / 2) = 0 for cosine too


# total_steps=10, warmup_ratio=0.2 (2 warm-up steps), peak 1.0: the multiplier, written out by hand
HAND = {
    "linear": {0: 1 / 3, 1: 2 / 3, 2: 1.0, 6: 0.5, 9: 1 / 8, 10: 0.0},
    "cosine": {0: 1 / 3, 1: 2 / 3, 2: 1.0, 6: 0.5, 9: 0.038060233744356624, 10: 0.0},
    "constant": {0: 1 / 3, 1: 2 / 3, 2: 1.0, 6: 1.0, 9: 1.0, 10: 1.0},
}


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_schedule_matches_hand_computed_values(kind):
    lrs = schedule(kind, 1.0, 0.2, 10)
    for step, value in HAND[kind].items():
        assert same(lrs[step], value), (kind, step, lrs[step], value)
    assert lrs[0] < lrs[1] < lrs[2]  # warm-up rises


def test_single_step_run_trains_at_the_peak():
    """total_steps=1: no warm-up whatever the ratio, the one update runs at the peak lr."""
    for kind in SCHEDULERS:
        for ratio in (0.0, 0.5, 0.99):
            assert schedule(kind, 2e-4, ratio, 1)[0] == pytest.approx(2e-4, rel=1e-12)


RUN = dict(batch_size=4, micro_batch_size=2, max_steps=6, learning_rate=1e-3, lora_r=4, lora_alpha=8,
           lora_dropout=0.0, val_set_size=0, cutoff_len=64, gradient_checkpointing=False, save_steps=1000,
           quantization=None, compute_dtype="float32", device="cpu")


@pytest.mark.parametrize(("kind", "ratio", "warmup"),
                         [("linear", 0.34, 2), ("cosine", 0.34, 2), ("constant", 0.34, 2), ("linear", 0.0, 0)])
def test_metrics_log_the_schedule(tiny_model_dir, tmp_path, kind, ratio, warmup):
    finetune(tiny_model_dir, SHORT_RECORDS, tmp_path, lr_scheduler=kind, warmup_ratio=ratio, **RUN)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for step, lr in logged.items():  # after `step` updates: the lr of the next one (0-based index `step`)
        assert same(lr, expected_lr(kind, 1e-3, step, warmup, 6)), (step, lr)
