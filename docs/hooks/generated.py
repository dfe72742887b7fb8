"""MkDocs hook: sections generated from the code at build time, so they cannot go stale.

A page asks for a section with a marker line ``<!-- generated: NAME -->``; :func:`on_page_markdown`
replaces it with the output of ``GENERATORS[NAME]``. An unknown name stops the build.

- ``cli-reference``: the ``--help`` of ``alpaca-lora`` and of every subcommand, from
  ``alpaca_lora.cli.main.build_parser()``.
- ``memory-24gb``: :func:`alpaca_lora.estimate_memory` for 7B, 8B and 13B Llama shapes.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from typing import Any

MARKER = re.compile(r"^<!-- generated: ([\w-]+) -->$", re.MULTILINE)
GIB = 1024**3
HELP_WIDTH = "100"

# Architecture fields from each model's published config.json (the estimate needs nothing else).
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "7B (Llama 2 7B)": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "8B (Llama 3 8B)": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "13B (Llama 2 13B)": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                              num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                              tie_word_embeddings=False),
}
# The recommended setting per model (examples/finetune_alpaca.py): micro-batch x cutoff_len.
RECOMMENDED = {"7B (Llama 2 7B)": (4, 512), "8B (Llama 3 8B)": (4, 512), "13B (Llama 2 13B)": (2, 512)}
MICRO_BATCHES = (1, 2, 4, 8)
CUTOFFS = (512, 1024, 2048)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Return the subcommand parsers of ``parser`` by name, in the order they were added."""
    # argparse has no public accessor for subparsers; _SubParsersAction is the documented class of
    # what add_subparsers() returns.
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _help(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH  # argparse wraps to the terminal width; fix it for the page
    try:
        return parser.format_help().rstrip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def cli_reference() -> str:
    """Markdown for the top-level help and each subcommand's help, as ``alpaca-lora`` prints it."""
    from alpaca_lora.cli.main import build_parser

    parser = build_parser()
    parts = ["## alpaca-lora", "", "```text", _help(parser), "```"]
    for name, sub in subcommands(parser).items():
        parts += ["", f"## alpaca-lora {name}", "", "```text", _help(sub), "```"]
    return "\n".join(parts)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def memory_24gb() -> str:
    """Markdown tables of estimate_memory() totals and the breakdown of the recommended settings."""
    from alpaca_lora import estimate_memory

    out = ["Estimated peak memory in GiB (NF4 base with double quantization, LoRA r 16 on q, k, v, o, "
           "bf16 compute, gradient checkpointing on), by micro-batch size and `cutoff_len`:", ""]
    out += ["| model | micro_batch_size | " + " | ".join(f"cutoff {c}" for c in CUTOFFS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in CUTOFFS) + " |"]
    for model, shape in LLAMA_SHAPES.items():
        for mb in MICRO_BATCHES:
            cells = [_gib(estimate_memory(shape, micro_batch_size=mb, cutoff_len=c).total) for c in CUTOFFS]
            out.append(f"| {model} | {mb} | " + " | ".join(cells) + " |")
    out += ["", "The recommended settings, by part (GiB); the last row turns gradient checkpointing off:", ""]
    estimates = {m: estimate_memory(LLAMA_SHAPES[m], micro_batch_size=mb, cutoff_len=c)
                 for m, (mb, c) in RECOMMENDED.items()}
    no_ckpt = {m: estimate_memory(LLAMA_SHAPES[m], micro_batch_size=mb, cutoff_len=c, gradient_checkpointing=False)
               for m, (mb, c) in RECOMMENDED.items()}
    header = [f"{m}, {mb} x {c}" for m, (mb, c) in RECOMMENDED.items()]
    out += ["| part | " + " | ".join(header) + " |", "| --- | " + " | ".join("---" for _ in header) + " |"]
    for part in next(iter(estimates.values())).parts:
        out.append(f"| {part} | " + " | ".join(_gib(e.parts[part]) for e in estimates.values()) + " |")
    out.append("| **total** | " + " | ".join(f"**{_gib(e.total)}**" for e in estimates.values()) + " |")
    out.append("| total without gradient checkpointing | "
               + " | ".join(_gib(e.total) for e in no_ckpt.values()) + " |")
    return "\n".join(out)


GENERATORS: dict[str, Callable[[], str]] = {"cli-reference": cli_reference, "memory-24gb": memory_24gb}


def render(markdown: str, where: str = "page") -> str:
    """Replace every ``<!-- generated: NAME -->`` line of ``markdown`` with its generated section."""
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"{where}: unknown generated section {name!r}; known: {sorted(GENERATORS)}")
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: fill the generated sections of a page."""
    return render(markdown, where=page.file.src_uri)
