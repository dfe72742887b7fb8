"""Load a base model (4-bit NF4 by default) and its tokenizer on the resolved device and compute dtype.

The folder checks live in :mod:`alpaca_lora.model.checks`, attaching LoRA in :mod:`alpaca_lora.model.lora`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from alpaca_lora.errors import ConfigError, ModelError, shown
from alpaca_lora.kernels.bnb_import import import_bitsandbytes
from alpaca_lora.kernels.cpu_features import cpu_flags
from alpaca_lora.kernels.cpu_memory import heap_returned_while
from alpaca_lora.model import folder_checks
from alpaca_lora.model.checks import check_base_folder, check_loading_info, check_special_tokens, check_vocabulary
from alpaca_lora.model.dtypes import DTYPES

logger = logging.getLogger(__name__)



# ---- device and dtype ------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    """Return the training device: CUDA (the local rank's GPU) when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA GPU is visible; use device='cpu' or 'auto'")
    return torch.device(device)


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags of native bf16 products: AMX tiles (Intel Sapphire Rapids and newer), AVX512-BF16 (AMD Zen 4
and newer, Intel Cooper Lake)."""


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 training beats fp32 on this CPU: it has native bf16 products (``BF16_CPU_FLAGS``).

    CPUs with neither emulate bf16, which runs slower than fp32 there (measurements in
    docs/performance.md, "Loading the base model").

    Args:
        flags: CPU flags to judge; None reads this machine's (:func:`cpu_flags`).

    """
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_CPU_FLAGS)


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    """Resolve "auto" to a concrete compute dtype for ``device``.

    "auto" is bf16 on a CUDA GPU that supports it, fp16 on an older GPU (with loss scaling), bf16 on
    a CPU with native bf16 products (AMX or AVX512-BF16) and fp32 on other CPUs, which emulate bf16
    (see :func:`cpu_has_native_bf16`).
    """
    if compute_dtype != "auto":
        if compute_dtype not in DTYPES:
            raise ConfigError(f"compute_dtype={compute_dtype!r}: must be 'auto' or one of {list(DTYPES)}")
        return DTYPES[compute_dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


# ---- tokenizer -------------------------------------------------------------------------------


def load_tokenizer(base_model: str | Path) -> Any:
    """Load the tokenizer of ``base_model`` and make sure it can pad without breaking EOS learning.

    A missing pad token is set to the unknown token when there is one distinct from EOS, else to
    EOS. Pad == EOS is safe here because the collator masks padding by position, never by id.
    A folder that asks to run its own code is refused (never ``trust_remote_code``), and so is a
    tokenizer whose special tokens have ids outside its vocabulary.

    Raises:
        ModelError: No tokenizer loads, the folder carries custom code, there is no EOS token, or a
            special token's id lies outside the vocabulary.

    """
    from transformers import AutoTokenizer

    folder = folder_checks.local_model_folder(base_model)
    if folder is not None:
        folder_checks.refuse_special_files(folder)
        folder_checks.refuse_custom_code(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_model), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure to build the tokenizer is the folder's
        raise ModelError(
            f"cannot load a tokenizer from {base_model!s} ({type(exc).__name__}: {shown(str(exc), 300)}); "
            "pass a local model folder with tokenizer files or a Hub id in the local cache"
        ) from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {base_model!s} has no EOS token; a model trained on it could never stop")
    if tokenizer.pad_token_id is None:
        use_unk = tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id
        tokenizer.pad_token = tokenizer.unk_token if use_unk else tokenizer.eos_token
    check_special_tokens(tokenizer, base_model)
    tokenizer.padding_side = "right"  # labels follow the prompt; generate() pads left so prompts end together
    return tokenizer


# ---- model -----------------------------------------------------------------------------------


def quantization_config(
    quantization: str | None, compute_dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8
) -> Any:
    """Return the bitsandbytes config for "nf4", "fp4", "int8", or None for full precision.

    ``quant_storage`` is the dtype the packed 4-bit weights are stored in: uint8 by default; FSDP
    needs the compute dtype, because it shards only float tensors and flattens each wrapped unit
    into one tensor of a single dtype (bitsandbytes' FSDP-QLoRA guide).
    """
    from transformers import BitsAndBytesConfig

    if quantization is None:
        return None
    if quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=True,  # QLoRA's double quantization: ~0.4 bit/param saved
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=quant_storage,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"quantization={quantization!r}: must be 'nf4', 'fp4', 'int8' or None")


def load_model(
    base_model: str | Path,
    quantization: str | None = "nf4",
    compute_dtype: str = "auto",
    *,
    device: str = "auto",
    quant_storage: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM (4-bit NF4 with double quantization by default) and its tokenizer.

    Only safetensors weights are loaded, and never with ``trust_remote_code``. A local folder is
    checked before any weight is read (:func:`~alpaca_lora.model.checks.check_base_folder`), and the
    load itself must fill every tensor of the model from the files: a damaged or mismatched folder
    is a ``ModelError``, never a half-loaded model.

    Args:
        base_model: A local model folder or a Hub id already in the local cache.
        quantization: "nf4" (default), "fp4", "int8", or None for full precision.
        compute_dtype: "auto", "float32", "bfloat16" or "float16" (see :func:`resolve_compute_dtype`).
        device: "auto", "cpu", "cuda" or "cuda:N".
        quant_storage: Storage dtype of 4-bit weights: None for uint8, "compute" for the compute
            dtype (what FSDP needs).

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``, ready for
        :func:`~alpaca_lora.model.lora.attach_lora`.

    Raises:
        ModelError: The folder is missing, asks to run its own code, holds no (or damaged)
            safetensors weights, its config.json does not describe its weights, its tokenizer
            does not fit the embedding, or the load fails.

    """
    return load_base(base_model, quantization, compute_dtype, device=device, quant_storage=quant_storage)


def load_base(
    base_model: str | Path,
    quantization: str | None = "nf4",
    compute_dtype: str = "auto",
    *,
    device: str = "auto",
    quant_storage: str | None = None,
    tokenizer: Any = None,
    new_tokens: int = 0,
) -> tuple[Any, Any]:
    """:func:`load_model`, reusing ``tokenizer`` when the caller loaded it already (fine-tuning does, for the data).

    A given tokenizer is checked against the model's embedding like a loaded one, without the last
    ``new_tokens`` tokens it was given for training (their rows are added after loading); the other
    arguments, the result and the errors are those of :func:`load_model`.
    """
    from transformers import AutoModelForCausalLM

    if quantization is not None:
        import_bitsandbytes()  # transformers would import it, printing a notice about an optional package
    dev = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, dev)
    folder = folder_checks.local_model_folder(base_model)
    embedding_rows = check_base_folder(folder) if folder is not None else None
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base_model)
    if embedding_rows is not None:
        check_vocabulary(tokenizer, embedding_rows, base_model, new_tokens)
    # On the CPU, loading frees hundreds of large quantization temporaries: hand them back at once.
    loading = heap_returned_while() if dev.type == "cpu" else contextlib.nullcontext()
    with loading:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(base_model),
                quantization_config=quantization_config(
                    quantization, dtype, dtype if quant_storage == "compute" else torch.uint8
                ),
                dtype=dtype,
                device_map={"": dev},
                use_safetensors=True,
                trust_remote_code=False,
                output_loading_info=True,
            )
        except Exception as exc:  # noqa: BLE001 - the folder passed our checks; any other failure is reported alike
            raise ModelError(
                f"cannot load the base model {base_model!s} ({type(exc).__name__}: {shown(str(exc), 300)}). It must "
                "be a local folder (or cached Hub id) with config.json and *.safetensors weights; convert .bin "
                "weights first"
            ) from None
    check_loading_info(info, base_model)
    if embedding_rows is None:
        check_vocabulary(tokenizer, model.get_input_embeddings().num_embeddings, base_model)
    model.config.use_cache = False
    if dev.type == "cpu":
        copied = copy_file_backed_tensors(model)
        if copied:
            logger.debug("copied %d tensors out of the mapped weight files", copied)
    return model, tokenizer


def _mapped_weight_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped ``*.safetensors`` files (Linux; else empty)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def copy_file_backed_tensors(model: torch.nn.Module) -> int:
    """Give the parameters and buffers that still point into a mapped weight file memory of their own.

    On the CPU, ``from_pretrained`` keeps tensors whose dtype needs no conversion (the unquantized
    embedding and norms of an fp32 checkpoint) as views of the memory-mapped safetensors file, and
    one such view keeps the whole mapping, and every page of it that loading read, resident (several
    times the 4-bit model's size; docs/performance.md). Copying those few tensors lets the mapping go.

    Returns:
        How many tensors were copied (0 where none pointed into a mapping, or off Linux).

    """
    ranges = _mapped_weight_ranges()
    if not ranges:
        return 0
    copied = 0
    with torch.no_grad():
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for tensor in table.values():
                    if tensor is None or tensor.device.type != "cpu":
                        continue
                    address = tensor.untyped_storage().data_ptr()
                    if any(start <= address < end for start, end in ranges):
                        tensor.data = tensor.data.clone()
                        copied += 1
    return copied


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts (4-bit weights counted as stored elements x 2)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # two 4-bit values per stored byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
