"""Run one fine-tune under a launcher (torchrun / accelerate launch) and dump what each rank holds.

Usage: dist_finetune.py MODEL_DIR OUTPUT_DIR DUMP_DIR CONFIG_JSON [--fail-on-rank R --fail-at-step S]

The steps of ``finetune()`` (setup -> fit -> save) are called one by one so that the
trained model of every rank is reachable: each rank writes its LoRA weights to
``DUMP_DIR/rank{R}.safetensors`` and its result to ``DUMP_DIR/rank{R}.json``. With ``--fail-on-rank``
that rank's collator raises at the given optimizer step, mid-training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from alpaca_lora.config import FinetuneConfig
from alpaca_lora.train.distributed import init_distributed
from alpaca_lora.train.recipe import fit, save
from alpaca_lora.train.setup import setup


class FailingCollator:
    """A collator that raises on its n-th call (the data of one rank going bad mid-run)."""

    def __init__(self, inner, fail_at_call: int) -> None:
        self.inner, self.calls, self.fail_at_call = inner, 0, fail_at_call

    def __call__(self, records):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise RuntimeError(f"injected failure at collator call {self.calls}")
        return self.inner(records)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("output_dir")
    parser.add_argument("dump_dir")
    parser.add_argument("config_json")
    parser.add_argument("--fail-on-rank", type=int, default=-1)
    parser.add_argument("--fail-at-call", type=int, default=0)
    args = parser.parse_args()
    spec = json.loads(Path(args.config_json).read_text())
    cfg = FinetuneConfig.from_dict(spec["config"])
    dist = init_distributed(cfg.device, cfg.ddp_timeout)
    try:
        with dist.guard("setup"):
            run = setup(args.model_dir, spec["records"], Path(args.output_dir), cfg, dist)
        if dist.rank == args.fail_on_rank:
            run.collator = FailingCollator(run.collator, args.fail_at_call)
        try:
            fit(run)
            result = save(run)
        finally:
            run.metrics.close()
        dump = Path(args.dump_dir)
        weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(run.model).items()}
        save_file(weights, str(dump / f"rank{dist.rank}.safetensors"))
        info = {"rank": dist.rank, "world_size": dist.world_size, "backend": dist.backend,
                "train_loss": result.train_loss, "eval_loss": result.eval_loss, "steps": result.steps,
                "tokens_seen": result.tokens_seen, "losses": [r["loss"] for r in run.metrics.records if "loss" in r],
                "data_cache_hit": run.data_cache_hit}
        (dump / f"rank{dist.rank}.json").write_text(json.dumps(info))
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
