"""The ``alpaca-lora`` command. The only module that reads ``sys.argv``; nothing imports it.

Subcommands: ``finetune``, ``merge``, ``export-gguf``, ``eval``, ``generate``, ``push``, ``inspect``, ``estimate``,
``cache``, ``self-instruct``, ``demo`` and ``ui``.
Their flags are generated (see :mod:`alpaca_lora.cli.flags`) from :class:`FinetuneConfig` and from
the signatures and docstrings of the functions they call, so the command line and the Python API
cannot drift apart. ``--config run.yaml`` (or .json) supplies ``FinetuneConfig`` fields; flags
override it. Exit codes: 0 success, 2 usage error (unknown flag or config key, with close matches;
a bad value), 1 failure with a one-line cause (``--debug`` shows the traceback), 130 / 143 when a
first Ctrl-C / SIGTERM stopped training after saving a checkpoint (128 + the signal number, as a
shell reports a job ended by that signal; the message says how to resume). A ``ConfigError`` raised
by the library (a bad value found by the function the command calls) is a usage error too.

The library modules (torch, transformers) are imported inside :func:`main`, so a Ctrl-C during those
seconds of imports ends the command with status 130 and one line, like any other Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alpaca_lora.cli.cache_cmd import add_cache_parser, cmd_cache
from alpaca_lora.cli.eval_cmd import add_eval_parser, cmd_eval
from alpaca_lora.cli.flags import (
    ArgumentParser,
    add_dataclass_flags,
    add_flag,
    add_signature_flags,
    docstring_args,
    plain_doc,
)
from alpaca_lora.cli.gguf_cmd import add_gguf_parser, cmd_export_gguf
from alpaca_lora.cli.selfinstruct_cmd import add_self_instruct_parser, cmd_self_instruct
from alpaca_lora.cli.ui_cmd import add_ui_parser, cmd_ui
from alpaca_lora.config import FinetuneConfig
from alpaca_lora.errors import AlpacaLoraError, ConfigError, DataError, TrainingInterrupted

logger = logging.getLogger(__name__)

_CONFIG_HELP = "a JSON or YAML file of FinetuneConfig fields; flags override it"
_GENERATE_EPILOG = (
    "Instructions: alpaca-lora generate FOLDER 'Name three colors.' 'Add 2 and 3.' prints one answer per "
    "instruction, rendered with the folder's prompt template (--template overrides it). Conversations: "
    "alpaca-lora generate FOLDER --messages FILE prints one answer per conversation, the assistant's next turn, "
    "rendered with the folder's chat template (--chat_template overrides it). FILE is a .json file holding one "
    "conversation ([{\"role\": \"user\", \"content\": \"Hi\"}, ...]) or a list of them, a .jsonl file with one "
    "conversation per line, or a data file in messages or ShareGPT form (.json, .jsonl, .csv, .parquet records "
    "with a 'messages' or 'conversations' list), where each record's turns before its last assistant turn are "
    "the prompt."
)
_MESSAGES_FORMS = ("--messages takes a .json file holding one conversation ([{\"role\": \"user\", \"content\": "
                   "\"Hi\"}, ...]) or a list of them, a .jsonl file with one conversation per line, or records in "
                   "messages or ShareGPT form (a 'messages' or 'conversations' list per record)")


class _Usage(Exception):
    """A usage problem found after parsing (a bad config file or value): exit status 2."""


def build_parser() -> ArgumentParser:
    """Build the argument parser with every subcommand (this imports the library: torch, transformers)."""
    from alpaca_lora.demo.run import BUDGETS, DemoConfig
    from alpaca_lora.export.hub import push_to_hub
    from alpaca_lora.export.merge import merge
    from alpaca_lora.inference.generate import generate
    from alpaca_lora.train.inspection import inspect_data
    from alpaca_lora.train.memory import estimate_memory
    from alpaca_lora.train.recipe import finetune

    parser = ArgumentParser(prog="alpaca-lora", description="LoRA/QLoRA instruction tuning of Llama-family models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="print results only, no progress log")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ft = sub.add_parser("finetune", help="fine-tune LoRA adapters on a base model",
                        description="Fine-tune LoRA adapters; every FinetuneConfig field is a flag.")
    add_signature_flags(ft, finetune, skip=("config",), as_flags=("base_model", "data"))
    ft.add_argument("--config", help=_CONFIG_HELP)
    add_dataclass_flags(ft, FinetuneConfig)

    mg = sub.add_parser("merge", help="fold an adapter into full-precision base weights",
                        description=_first_line(merge))
    add_signature_flags(mg, merge)
    add_gguf_parser(sub)
    add_eval_parser(sub)

    gen = sub.add_parser("generate", help="answer instructions or conversations with an adapter or merged folder",
                         description=_first_line(generate), epilog=_GENERATE_EPILOG)
    add_signature_flags(gen, generate, skip=("tokenizer",), many=("instruction",), optional=("instruction",))
    add_flag(gen, "messages", str, None, "a file of conversations to answer instead of instructions (see below)")

    push = sub.add_parser("push", help="upload a merged or adapter folder to the Hugging Face Hub",
                          description=_first_line(push_to_hub) + " The token comes from HF_TOKEN or "
                          "`hf auth login`, never from the command line.")
    add_signature_flags(push, push_to_hub, skip=("token",))

    ins = sub.add_parser("inspect", help="count, measure and mask a data set before training",
                         description=_first_line(inspect_data) + " Alpaca records or conversations (messages "
                         "or ShareGPT, detected from the columns). The example shows its masked spans in [[...]]: "
                         "the text outside them is what the model learns (the response or the assistant turns, "
                         "each with its end token).")
    add_signature_flags(ins, inspect_data)
    ins.add_argument("--config", help=_CONFIG_HELP + " (the data fields are used)")

    est = sub.add_parser("estimate", help="estimate the peak memory of a run, by part",
                         description=_first_line(estimate_memory) + " Every FinetuneConfig field is a flag.")
    add_flag(est, "base_model", str, None,
             docstring_args(estimate_memory)["base_model"] + " None: the embedded default base.")
    est.add_argument("--config", help=_CONFIG_HELP)
    add_flag(est, "gpu_memory", str, None, "memory of the GPU, e.g. 24GB or 80GiB: says whether the run fits and "
             "what to change if not")
    add_dataclass_flags(est, FinetuneConfig)

    add_cache_parser(sub)
    add_self_instruct_parser(sub)
    add_ui_parser(sub)

    demo = sub.add_parser("demo", help="fine-tune the embedded SmolLM2-135M on built-in tasks, end to end")
    add_dataclass_flags(demo, DemoConfig)
    demo.epilog = f"budgets (optimizer steps of 16 examples): {BUDGETS}"
    return parser


def _first_line(func: Any) -> str:
    return plain_doc((func.__doc__ or "").strip().splitlines()[0])


def _given(args: argparse.Namespace, names: list[str] | set[str]) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in names}


def _config(args: argparse.Namespace) -> FinetuneConfig:
    """The ``--config`` file (or the defaults) with the FinetuneConfig flags applied on top."""
    try:
        config = getattr(args, "config", None)
        cfg = FinetuneConfig.from_file(config) if config is not None else FinetuneConfig()
        return cfg.replace(**_given(args, {f.name for f in dataclasses.fields(FinetuneConfig)}))
    except ConfigError as exc:
        raise _Usage(str(exc)) from None


def _cmd_finetune(args: argparse.Namespace) -> int:
    from alpaca_lora.train.recipe import finetune

    cfg = _config(args)
    result = finetune(args.base_model, args.data, config=cfg, **_given(args, {"output_dir"}))  # else its default
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch, process 0 reports
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}, indent=2))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from alpaca_lora.export import layout as art
    from alpaca_lora.export.merge import merge

    kwargs = _given(args, {"base_model", "dtype", "max_shard_size", "merge_into", "allow_base_mismatch", "verify"})
    out = merge(args.adapter_dir, args.output_dir, **kwargs)
    report = json.loads((out / art.MERGE_REPORT).read_text(encoding="utf-8"))
    check = report.get("verification") or {}
    print(f"merged {args.adapter_dir} into {report['base_model']} -> {out} "
          f"({report['dtype']}, {len(report['weight_files'])} weight file(s))")
    if check:
        print("verification: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in check.items() if not isinstance(v, (dict, list))))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from alpaca_lora.inference.generate import generate

    kwargs = {k: v for k, v in vars(args).items()
              if k not in ("command", "debug", "quiet", "model_or_dir", "instruction", "messages")}
    requests = _generate_requests(args)
    if kwargs.get("stream"):
        if len(requests) > 1:
            raise _Usage(f"--stream answers one request, and there are {len(requests)}; give one, or drop --stream")
        for piece in generate(args.model_or_dir, requests[0], **kwargs):
            print(piece, end="", flush=True)
        print()
        return 0
    single = len(requests) == 1
    texts = generate(args.model_or_dir, requests[0] if single else requests, **kwargs)
    for text in [texts] if single else texts:
        print(text)
    return 0


def _generate_requests(args: argparse.Namespace) -> list[Any]:
    """The instructions, or the conversations of ``--messages``; a usage error for a mix of the two."""
    messages = getattr(args, "messages", None)
    if messages is None:
        if not args.instruction:
            raise _Usage("give one or more instructions, or --messages FILE with conversations to answer")
        if getattr(args, "chat_template", None) is not None:
            raise _Usage("--chat_template renders conversations (--messages FILE); instructions use --template")
        return list(args.instruction)
    if args.instruction:
        raise _Usage(f"give instructions or --messages FILE, not both (got {len(args.instruction)} instruction(s) "
                     "and --messages)")
    if getattr(args, "template", None) is not None:
        raise _Usage("--template renders instructions; conversations use the folder's chat template, or "
                     "--chat_template")
    return _conversations_file(messages)


def _conversations_file(path: str) -> list[list[dict[str, Any]]]:
    """The conversations a ``--messages`` file asks to answer (the forms of the generate command's help).

    Raises:
        DataError: The file cannot be read, or a record is not a conversation (naming the file and the record).

    """
    from alpaca_lora.data.chat import normalize_messages
    from alpaca_lora.data.conversations import conversation_format, read_conversations
    from alpaca_lora.data.records import listed, read_items

    name, items, columns = read_items(path)
    bad = next(((where, problem) for where, _, problem in items if problem), None)
    if bad is not None:
        raise DataError(f"{bad[0]}: {bad[1]}")
    fmt = conversation_format(columns)
    if fmt is not None:  # training records: the turns before the last assistant turn are the prompt
        records, skipped = read_conversations(name, items, format=fmt, skip_bad_records=True)
        if skipped:
            more = f" (and {len(skipped) - 1} more bad record(s))" if len(skipped) > 1 else ""
            raise DataError(f"{skipped[0]}{more}; in a --messages data file each record's turns before its last "
                            "assistant turn are the prompt")
        with_tools = sum(1 for r in records if r["tools"])
        if with_tools:
            logger.warning("%s: %d record(s) list tool schemas, which generate does not render: their prompts "
                           "leave the schemas out", name, with_tools)
        return [_prompt_turns(where, r["messages"]) for (where, _, _), r in zip(items, records, strict=True)]
    if "role" in columns and all(isinstance(obj, dict) for _, obj, _ in items):  # the file is one conversation
        items = [(name, [obj for _, obj, _ in items], None)]
    if not any(isinstance(obj, list) for _, obj, _ in items):
        raise DataError(f"{name} holds no conversations (its columns: {listed(columns)}); {_MESSAGES_FORMS}. To "
                        "answer instructions, give them as arguments")
    out = []
    for where, obj, _ in items:
        try:
            out.append(normalize_messages(obj, require_assistant=False))
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    return out


def _prompt_turns(where: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A training record's turns before its last assistant turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last == 0:
        raise DataError(f"{where}: the first turn is the assistant's, so no turn before it asks for an answer; "
                        "start the conversation with a user (or system) turn")
    return messages[:last]


def _cmd_push(args: argparse.Namespace) -> int:
    from alpaca_lora.export.hub import push_to_hub

    kwargs = _given(args, {"private", "dry_run", "commit_message"})
    files = push_to_hub(args.folder, args.repo_id, **kwargs)
    verb = "would upload" if kwargs.get("dry_run") else "uploaded"
    print(f"{verb} {len(files)} file(s) from {args.folder} to {args.repo_id}:")
    for name in files:
        print(f"  {name}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from alpaca_lora.train.inspection import format_inspection, inspect_data

    names = {"cutoff_len", "template", "train_on_inputs", "add_eos_token", "column_map", "data_format", "chat_template"}
    kwargs = {k: v for k, v in _config(args).to_dict().items() if k in names} if args.config is not None else {}
    kwargs.update(_given(args, names))
    report = inspect_data(args.data, getattr(args, "base_model", None), **kwargs)
    print(format_inspection(report))
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from alpaca_lora.model.embedded import default_base_model
    from alpaca_lora.train.memory import estimate_memory, format_fit, parse_memory_size

    cfg = _config(args)
    base = getattr(args, "base_model", None) or default_base_model()
    try:
        budget = parse_memory_size(args.gpu_memory) if getattr(args, "gpu_memory", None) else None
    except ConfigError as exc:
        raise _Usage(str(exc)) from None
    est = estimate_memory(base, **cfg.to_dict())
    print(f"base model: {base}")
    print(est.summary())
    if budget is not None:
        print(format_fit(base, budget, cfg.to_dict()))
    return 0


_COMMANDS = {"finetune": _cmd_finetune, "merge": _cmd_merge, "export-gguf": cmd_export_gguf, "eval": cmd_eval,
             "generate": _cmd_generate, "push": _cmd_push, "inspect": _cmd_inspect, "estimate": _cmd_estimate,
             "self-instruct": cmd_self_instruct, "cache": cmd_cache, "ui": cmd_ui}


def _cmd_demo(args: argparse.Namespace) -> int:
    from alpaca_lora.demo.run import DemoConfig, format_report, run_demo

    cfg = DemoConfig(**_given(args, {f.name for f in dataclasses.fields(DemoConfig)}))
    print(format_report(run_demo(cfg)))
    return 0


MAX_MESSAGE_CHARS = 4000
"""Longest error line printed: a library's message may quote a user's value whole."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_MESSAGE_CHARS else f"{text[:MAX_MESSAGE_CHARS]}... ({len(text):,} characters)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``alpaca-lora`` command; returns the exit status.

    Args:
        argv: The arguments after the program name; None reads ``sys.argv``.

    """
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while the library is imported, before any command runs
        print("alpaca-lora: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command_parser = subparsers.choices[args.command]
    if extras:
        command_parser.fail_unknown(extras)
    with _command_logging(quiet=args.quiet):
        return _run_command(args, command_parser)


@contextlib.contextmanager
def _command_logging(quiet: bool) -> Iterator[None]:
    """The library's INFO messages on stderr while one command runs (undone after: no handler is left behind)."""
    log = logging.getLogger("alpaca_lora")
    if quiet or log.handlers:  # the caller's own logging setup stays as it is
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _run_command(args: argparse.Namespace, command_parser: argparse.ArgumentParser) -> int:
    handler_fn = {**_COMMANDS, "demo": _cmd_demo}[args.command]
    try:
        return handler_fn(args)
    except _Usage as exc:
        command_parser.print_usage(sys.stderr)
        print(f"{command_parser.prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:  # a checkpoint was saved; 128 + the signal number, as a shell reports
        print(f"alpaca-lora {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:  # a bad value the called function found: a usage error, as the flags' own
        if args.debug:
            raise
        print(f"{command_parser.prog}: error: {_one_line(exc)} (see {command_parser.prog} --help)", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        kind = "" if isinstance(exc, AlpacaLoraError) else f"{type(exc).__name__}: "
        print(f"alpaca-lora {args.command}: error: {kind}{_one_line(exc)} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
