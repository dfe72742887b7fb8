"""``alpaca-lora export-gguf``: a merged model, a model folder or an adapter as a verified GGUF file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from alpaca_lora.cli.flags import add_signature_flags


def add_gguf_parser(sub: Any) -> None:
    """Add the ``export-gguf`` subcommand to the subparsers ``sub``."""
    from alpaca_lora.export.gguf import export_gguf

    gg = sub.add_parser("export-gguf", help="write a model or adapter as GGUF for llama.cpp, Ollama and LM Studio",
                        description="Write a merged model folder, a Llama model folder or an adapter folder (merged "
                        "on the fly) as one GGUF file, read it back and compare its logits with the source. Beside "
                        "it: NAME.json (the export report) and NAME.Modelfile (for `ollama create`).")
    add_signature_flags(gg, export_gguf)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    """Export, then print the file, its size and the verification figures."""
    from alpaca_lora.export.gguf import REPORT_SUFFIX, export_gguf

    names = ("quantization", "base_model", "adapter_only", "overwrite", "verify")
    out = export_gguf(args.model_dir, args.out_path, **{k: v for k, v in vars(args).items() if k in names})
    report = json.loads(Path(str(out).removesuffix(".gguf") + REPORT_SUFFIX).read_text(encoding="utf-8"))
    print(f"wrote {out} ({report['quantization']}, {report['size_bytes'] / 1e6:,.1f} MB; tensors "
          + ", ".join(f"{n} {k}" for k, n in sorted(report["tensor_types"].items())) + ")")
    check = report.get("verification")
    if check:
        print(f"verification: logits off by {check['relative_rms_diff']:.3g} (relative RMS, tolerance "
              f"{check['tolerance']:g}), largest difference {check['max_abs_logit_diff']:.3g}, top-1 agreement "
              f"{100 * check['top1_agreement']:.1f}%")
    if not getattr(args, "adapter_only", False):
        print(f"ollama: ollama create {out.stem} -f {out.with_name(out.stem + '.Modelfile')}")
    return 0
