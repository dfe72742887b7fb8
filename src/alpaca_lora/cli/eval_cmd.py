"""``alpaca-lora eval``: score a model's answers on held-out records, optionally beside another model."""

from __future__ import annotations

import argparse
from typing import Any

from alpaca_lora.cli.flags import add_flag


def add_eval_parser(sub: Any) -> None:
    """Add the ``eval`` subcommand to the subparsers ``sub``."""
    from alpaca_lora.data.metrics import METRICS

    ev = sub.add_parser("eval", help="score answers on held-out records: exact match, BLEU, ROUGE-L, chrF, loss",
                        description="Answer every record greedily and score the answers against the records' "
                        "outputs (exact match, sacreBLEU BLEU and chrF, ROUGE-L) with 95% bootstrap intervals, "
                        "plus the eval loss; with --compare, another model (e.g. the base) on the same prompts, "
                        "side by side, with the records that changed most.")
    ev.add_argument("model", metavar="MODEL", help="an adapter folder, a merged folder or a model folder")
    ev.add_argument("data", metavar="DATA", help="held-out records (.json, .jsonl, .csv, .parquet): Alpaca "
                    "records or conversations; a 'kind' field gives per-kind scores")
    ev.add_argument("--compare", default=None, help="another model folder scored on the same records")
    ev.add_argument("--metrics", nargs="+", default=list(METRICS), help=f"any of {' '.join(METRICS)}")
    add_flag(ev, "max_new_tokens", int, 128, "most tokens per answer")
    add_flag(ev, "batch_size", int, 8, "records answered per forward pass")
    add_flag(ev, "limit", int, None, "score only the first LIMIT records")
    add_flag(ev, "bootstrap", int, 1000, "resamples for the 95 percent intervals (0: none)")
    ev.add_argument("--ignore_case", action="store_true", help="exact match ignores case")
    ev.add_argument("--no_loss", action="store_true", help="skip the eval loss and perplexity")
    ev.add_argument("--template", default=None, help="prompt template override (default: the folder's own)")
    ev.add_argument("--base_model", default=None, help="for an adapter folder, the base to load instead")
    ev.add_argument("--compute_dtype", default="auto", help="auto, float32, bfloat16 or float16")
    ev.add_argument("--output", default=None, help="write the report here (.json) and its records beside it "
                    "(.jsonl)")


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate, print the table and the records that changed most, and save the report when asked."""
    from pathlib import Path

    from alpaca_lora.inference.evaluate import evaluate

    counts = {name: getattr(args, name, default) for name, default in
              (("max_new_tokens", 128), ("batch_size", 8), ("limit", None), ("bootstrap", 1000))}
    report = evaluate(args.model, args.data, metrics=args.metrics, **counts,
                      ignore_case=args.ignore_case, loss=not args.no_loss, template=args.template,
                      compare=args.compare, base_model=args.base_model, compute_dtype=args.compute_dtype)
    n = len(report.rows)
    print(f"{args.model} on {n} record{'s' * (n != 1)} of {args.data}"
          + (f", beside {args.compare}" if args.compare else "") + ":")
    print(report.table())
    changed = report.changed(5)
    if changed:
        print("\nrecords that changed most:")
        for row in changed:
            text = " ".join(f"{row['instruction']} {row.get('input', '')}".split())
            print(f"- {text[:70]!r}: {row['compare_prediction'][:40]!r} -> {row['prediction'][:40]!r} "
                  f"(expected {row['reference'][:40]!r})")
    if args.output:
        out = report.to_json(args.output)
        records = Path(args.output).with_suffix(".jsonl")
        if records == Path(args.output):  # --output x.jsonl: the records must not overwrite the report
            records = records.with_suffix(".records.jsonl")
        rows = report.to_jsonl(records)
        print(f"\nreport: {out}; records: {rows}")
    return 0
