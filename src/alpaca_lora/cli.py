"""The ``alpaca-lora`` command. The only module that reads ``sys.argv``; nothing imports it.

Flags of ``finetune`` are generated from :class:`FinetuneConfig` (names, types, defaults and the
field docs), so the command line and the Python API cannot drift apart. Exit codes: 0 success,
2 usage error, 1 failure with a one-line cause (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from alpaca_lora.config import FinetuneConfig
from alpaca_lora.demo import BUDGETS, DemoConfig, format_report, run_demo
from alpaca_lora.errors import AlpacaLoraError


def _field_docs(cls: type) -> dict[str, str]:
    """Read the docstring under each dataclass field from the source (the documented defaults)."""
    import inspect

    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = nxt.value.value
    return docs


def _parse_value(text: str) -> Any:
    """Parse a flag value: JSON (numbers, true/false/null, lists, objects) or a plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        kind: Any = _parse_value
        if hint is bool:
            kind = _bool
        elif hint is int:
            kind = int
        elif hint is float:
            kind = float
        elif hint is str:
            kind = str
        parser.add_argument(f"--{f.name}", dest=f.name, type=kind, default=argparse.SUPPRESS, metavar="V",
                            help=f"{docs.get(f.name, '')} (default: {f.default!r})".replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="alpaca-lora", description="LoRA/QLoRA instruction tuning.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fine-tune the embedded SmolLM2-135M on built-in tasks, end to end")
    _add_dataclass_flags(demo, DemoConfig)
    demo.epilog = f"budgets (optimizer steps of 16 examples): {BUDGETS}"

    ft = sub.add_parser("finetune", help="fine-tune LoRA adapters on a base model")
    ft.add_argument("--base_model", required=True, help="local model folder or cached Hub id")
    ft.add_argument("--data", required=True, help="a .json, .jsonl, .csv or .parquet file")
    ft.add_argument("--output_dir", default="lora-alpaca", help="output folder (default: lora-alpaca)")
    ft.add_argument("--config", help="a JSON or YAML file of FinetuneConfig fields; flags override it")
    _add_dataclass_flags(ft, FinetuneConfig)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in names})
    report = run_demo(cfg)
    print(format_report(report))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from alpaca_lora.train import finetune

    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    config = FinetuneConfig.from_file(args.config) if args.config else None
    result = finetune(args.base_model, args.data, Path(args.output_dir), config=config, **overrides)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``alpaca-lora`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"demo": _cmd_demo, "finetune": _cmd_finetune}
    try:
        return handlers[args.command](args)
    except AlpacaLoraError as exc:
        if args.debug:
            raise
        print(f"alpaca-lora {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alpaca-lora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
