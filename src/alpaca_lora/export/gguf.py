"""export_gguf(): a model or adapter as one GGUF file for llama.cpp, Ollama and LM Studio, verified.

The steps: read and check the source (:mod:`~alpaca_lora.export.gguf_source`), write a temporary file
beside the target (:mod:`~alpaca_lora.export.gguf_write`; k-quants through llama.cpp's quantizer), read it
back and compare logits (:mod:`~alpaca_lora.export.gguf_verify`), then rename it into place and write the
export report (``<name>.json``), the Ollama ``<name>.Modelfile`` and a section of the model card. A failure
at any step (a full disk included) leaves no partial file behind.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alpaca_lora.errors import ConfigError, ModelError, shown
from alpaca_lora.export import gguf_quant
from alpaca_lora.export import layout as art

logger = logging.getLogger(__name__)

REPORT_SUFFIX = ".json"
MODELFILE_SUFFIX = ".Modelfile"


def export_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    *,
    quantization: str = "q8_0",
    base_model: str | Path | None = None,
    adapter_only: bool = False,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write a model (or a LoRA adapter alone) as a GGUF file that llama.cpp, Ollama and LM Studio load.

    ``model_dir`` is a merged folder (from :func:`alpaca_lora.merge`), any Llama model folder, or an
    adapter folder (from :func:`alpaca_lora.finetune`), which is merged on the fly into the full-precision
    base, one tensor at a time. The file holds the weights under llama.cpp's names, the tokenizer, the
    rope and norm settings, the chat template training used (an Alpaca template rendered as one) and
    provenance (``alpaca_lora.*`` keys: base model, data fingerprint, LoRA settings).

    With ``adapter_only=True`` the adapter alone is written (llama.cpp's LoRA GGUF, loaded over a base GGUF
    with ``--lora``): export the base once with ``export_gguf(base_folder, "base.gguf")``.

    Args:
        model_dir: A merged model folder, a Llama model folder, or an adapter folder.
        out_path: The ``.gguf`` file to write.
        quantization: ``f32``, ``f16``, ``bf16``, ``q8_0`` (default) or ``q4_0``, written directly; or
            ``q4_k_m``, ``q5_k_m``, ``q6_k`` through llama.cpp's quantizer (llama-cpp-python). An adapter
            takes ``f32``, ``f16``, ``bf16`` or ``q8_0``.
        base_model: For an adapter folder: the base to merge into (None: the recorded one).
        adapter_only: Write the LoRA adapter alone instead of the merged model.
        overwrite: Replace an existing ``out_path`` (and its report and Modelfile).
        verify: Read the file back and compare its logits with the source model on a probe batch.

    Returns:
        ``out_path``. Beside it: ``<name>.json`` (the export report: tensor types, size, verification
        figures) and, for a model, ``<name>.Modelfile`` for ``ollama create``.

    Raises:
        ConfigError: A bad argument, or an existing ``out_path`` without ``overwrite=True``.
        ModelError: A non-Llama model, a missing tokenizer, a pre-tokenizer llama.cpp does not reproduce,
            a k-quant without llama-cpp-python, a full disk, or failed verification.

    Example:
        >>> export_gguf("merged", "model-q8_0.gguf")  # doctest: +SKIP

    """
    from alpaca_lora.export import gguf_adapter, ollama
    from alpaca_lora.export.gguf_names import llama_shape
    from alpaca_lora.export.gguf_source import chat_template_of, open_source
    from alpaca_lora.export.gguf_verify import verify_gguf
    from alpaca_lora.export.gguf_vocab import read_vocab
    from alpaca_lora.export.gguf_write import write_gguf

    quantization = _check_args(model_dir, out_path, quantization, base_model, adapter_only, overwrite, verify)
    model_dir, target = Path(model_dir).expanduser(), Path(out_path).expanduser()
    if adapter_only:
        if quantization not in gguf_adapter.ADAPTER_TYPES:
            raise ConfigError(f"quantization={quantization!r} is for whole models; an adapter is written as one of "
                              f"{list(gguf_adapter.ADAPTER_TYPES)}")
        if not art.is_run_folder(model_dir):
            raise ModelError(f"{model_dir} holds no {art.ADAPTER_CONFIG}; adapter_only=True exports the adapter "
                             "folder written by finetune")
    _check_target(target, overwrite)
    source = open_source(model_dir, base_model)
    shape = llama_shape(source.config, str(source.config_dir))
    report: dict[str, Any] = {"source": str(model_dir), "file": target.name, "quantization": quantization,
                              "provenance": source.provenance}
    with _partial(target) as tmp:
        if adapter_only:
            report.update(gguf_adapter.write_adapter(tmp, source, shape, quantization, verify))
        else:
            vocab = read_vocab(source.tokenizer, shape.vocab_size, chat_template_of(source), source.tokenizer_dir)
            direct = quantization if quantization in gguf_quant.DIRECT else "f16"
            report["tensor_types"] = write_gguf(tmp, source, shape, vocab, direct)
            if quantization not in gguf_quant.DIRECT:
                with _partial(target, ".kq") as quantized:
                    gguf_quant.quantize_with_llama_cpp(tmp, quantized, quantization)
                    os.replace(quantized, tmp)
                report["tensor_types"] = _types_in(tmp)
            report["chat_template"] = vocab.chat_template is not None
            report["verification"] = verify_gguf(tmp, source, shape, vocab, quantization) if verify else None
        report["size_bytes"] = tmp.stat().st_size
        os.replace(tmp, target)
    report_path = target.with_name(target.name.removesuffix(".gguf") + REPORT_SUFFIX)
    art.write_json(report_path, report)
    if not adapter_only:
        text = ollama.modelfile(target.name, source, chat_template_of(source))
        modelfile = target.with_name(target.name.removesuffix(".gguf") + MODELFILE_SUFFIX)
        try:
            modelfile.write_text(text, encoding="utf-8")
        except OSError as exc:
            logger.warning("could not write the Ollama Modelfile %s (%s); the GGUF file is complete", modelfile, exc)
        _record_in_card(Path(model_dir), report)
    logger.info("wrote %s (%s, %.1f MB)", target, quantization, report["size_bytes"] / 1e6)
    return target


def _check_args(model_dir: Any, out_path: Any, quantization: Any, base_model: Any, adapter_only: Any,
                overwrite: Any, verify: Any) -> str:
    for name, value in (("model_dir", model_dir), ("out_path", out_path), ("base_model", base_model)):
        if not (isinstance(value, (str, Path)) or (name == "base_model" and value is None)):
            raise ConfigError(f"{name}={shown(value)}: must be a path" + (" or None" * (name == "base_model")))
    for name, value in (("adapter_only", adapter_only), ("overwrite", overwrite), ("verify", verify)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={shown(value)}: must be True or False")
    if not str(out_path).endswith(".gguf"):
        raise ConfigError(f"out_path={shown(str(out_path))}: name the file *.gguf (llama.cpp, Ollama and LM Studio "
                          "look for that suffix)")
    quantization = gguf_quant.check_quantization(quantization)
    if quantization not in gguf_quant.DIRECT and not adapter_only:
        gguf_quant.require_llama_cpp(quantization)  # before anything is read or written
    return quantization


def _check_target(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise ConfigError(f"out_path {target} is a folder; pass the path of the .gguf file to write")
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it, or another name")
    if not target.parent.is_dir():
        raise ConfigError(f"the folder {target.parent} of out_path does not exist; create it first")


@contextmanager
def _partial(target: Path, tag: str = "") -> Iterator[Path]:
    """A temporary path beside ``target``, removed unless renamed away; a failed write becomes a ModelError."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}{tag}.", suffix=".partial", dir=target.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write in {target.parent} ({exc.strerror}); pass a folder you can write") from None
    os.close(fd)
    path = Path(name)
    try:
        yield path
    except OSError as exc:
        what = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror or str(exc)
        raise ModelError(f"could not write {target} ({what}); the partial file was removed. Free space in "
                         f"{target.parent} or write elsewhere") from exc
    finally:
        path.unlink(missing_ok=True)


def _types_in(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def _record_in_card(folder: Path, report: dict[str, Any]) -> None:
    """Add (or replace) this file's row in the GGUF section of the card of a folder merge() wrote.

    Any other folder is left as it is (a base model's card, or a hub cache's linked file, is not ours to
    edit); a card that cannot be written is a warning, since the GGUF file is already complete.
    """
    card = folder / "README.md"
    if not (card.is_file() and not card.is_symlink() and (folder / art.MERGE_REPORT).is_file()):
        return
    try:
        _add_card_row(card, report)
    except OSError as exc:
        logger.warning("could not add %s to the model card %s (%s)", report["file"], card, exc)


def _add_card_row(card: Path, report: dict[str, Any]) -> None:
    check = report.get("verification")
    row = (f"| `{report['file']}` | {report['quantization']} | {report['size_bytes'] / 1e6:.1f} MB | "
           + (f"{check['relative_max_diff']:.2e} of the largest logit, top-1 agreement "
              f"{100 * check['top1_agreement']:.1f}% |" if check else "not verified |"))
    text = card.read_text(encoding="utf-8")
    head = "## GGUF exports"
    if head not in text:
        text = text.rstrip("\n") + (f"\n\n{head}\n\nChecked against the merged model's logits on a probe "
                                    "batch.\n\n| File | Type | Size | Logit check |\n|---|---|---|---|\n")
    lines = [ln for ln in text.splitlines() if not re.match(rf"\| `{re.escape(report['file'])}` \|", ln)]
    at = max(i for i, ln in enumerate(lines) if ln.startswith("|") or ln == head)
    lines.insert(at + 1, row)
    card.write_text("\n".join(lines) + "\n", encoding="utf-8")
