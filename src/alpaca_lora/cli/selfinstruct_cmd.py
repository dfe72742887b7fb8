"""``alpaca-lora self-instruct``: new Alpaca records from seed tasks, written by a teacher model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from alpaca_lora.cli.flags import add_signature_flags


def add_self_instruct_parser(sub: Any) -> None:
    """Add the ``self-instruct`` subcommand to the subparsers ``sub``."""
    from alpaca_lora.selfinstruct.pipeline import self_instruct

    si = sub.add_parser("self-instruct", help="generate Alpaca records from seed tasks with a teacher model",
                        description="Ask a teacher (a local model folder or an OpenAI-compatible server) for new "
                        "tasks like the seed tasks, keep those that pass the filters (length, blacklisted words, "
                        "duplicates, ROUGE-L against every kept instruction), and append them to an Alpaca JSONL "
                        "file; run again to resume. The endpoint's API key comes from the environment variable "
                        "named by --api_key_env, never from the command line.",
                        epilog="example: alpaca-lora self-instruct seed_tasks.jsonl http://127.0.0.1:8080/v1 "
                        "generated.jsonl --num_instructions 500")
    add_signature_flags(si, self_instruct, skip=("progress",))


def cmd_self_instruct(args: argparse.Namespace) -> int:
    """Generate, then print the output, the counts and the throughput."""
    from alpaca_lora.selfinstruct.output import report_path
    from alpaca_lora.selfinstruct.pipeline import self_instruct

    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "quiet")}
    out = self_instruct(progress=not args.quiet, **kwargs)
    report = json.loads(report_path(out).read_text(encoding="utf-8")) if report_path(out).is_file() else {}
    rejected = {k: v for k, v in report.get("rejected", {}).items() if v}
    print(f"{out}: {report.get('kept', '?')} tasks kept ({report.get('status', 'done')}), "
          f"{sum(rejected.values())} rejected" + (f" ({', '.join(f'{k} {v}' for k, v in rejected.items())})"
                                                   if rejected else ""))
    if report.get("kept_per_minute") is not None:
        print(f"throughput: {report['kept_per_minute']:.1f} kept tasks a minute, {report['requests']} requests, "
              f"report {report_path(out)}")
    return 0
