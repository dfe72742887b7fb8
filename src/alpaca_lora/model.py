"""Load a base model (4-bit NF4 by default) with its tokenizer, and attach LoRA adapters."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alpaca_lora.bnb_import import import_bitsandbytes
from alpaca_lora.cpu_memory import heap_returned_while
from alpaca_lora.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

ATTENTION_PROJECTIONS = {
    # Llama, Mistral, Qwen, Gemma and most Llama-family models
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- device and dtype ------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    """Return the training device: CUDA (the local rank's GPU) when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA GPU is visible; use device='cpu' or 'auto'")
    return torch.device(device)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags of native bf16 products: AMX tiles (Intel Sapphire Rapids and newer), AVX512-BF16 (AMD Zen 4
and newer, Intel Cooper Lake)."""


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 training beats fp32 on this CPU: it has native bf16 products (``BF16_CPU_FLAGS``).

    Measured with the defaults on SmolLM2-135M (docs/precision.md): an AMD EPYC with AVX512-BF16 and
    no AMX ran 1.28x the fp32 tokens/s in bf16; an Intel Xeon with AMX ran faster in bf16 even
    without the fused LoRA layers. CPUs with neither emulate bf16 and stay in fp32.

    Args:
        flags: CPU flags to judge; None reads this machine's (:func:`cpu_flags`).

    """
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_CPU_FLAGS)


def active_compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype a hand-written autograd function computes in: autocast's when it is on, else ``default``.

    Read in the forward pass and kept for the backward pass, which autograd runs with autocast off.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    """Resolve "auto" to a concrete compute dtype for ``device``.

    "auto" is bf16 on a CUDA GPU that supports it, fp16 on an older GPU (with loss scaling), bf16 on
    a CPU with native bf16 products (AMX or AVX512-BF16) and fp32 on other CPUs, which emulate bf16
    (see :func:`cpu_has_native_bf16`).
    """
    if compute_dtype != "auto":
        if compute_dtype not in _DTYPES:
            raise ConfigError(f"compute_dtype={compute_dtype!r}: must be 'auto' or one of {list(_DTYPES)}")
        return _DTYPES[compute_dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


# ---- tokenizer -------------------------------------------------------------------------------


def load_tokenizer(base_model: str | Path) -> Any:
    """Load the tokenizer of ``base_model`` and make sure it can pad without breaking EOS learning.

    A missing pad token is set to the unknown token when there is one distinct from EOS, else to
    EOS. Pad == EOS is safe here because the collator masks padding by position, never by id.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    except Exception as exc:
        raise ModelError(
            f"cannot load a tokenizer from {base_model!s} ({type(exc).__name__}: {exc}); "
            "pass a local model folder with tokenizer files or a Hub id in the local cache"
        ) from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {base_model!s} has no EOS token; a model trained on it could never stop")
    if tokenizer.pad_token_id is None:
        use_unk = tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id
        tokenizer.pad_token = tokenizer.unk_token if use_unk else tokenizer.eos_token
    tokenizer.padding_side = "right"  # training pads right; generate() switches to left (mistake 5)
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

    Only safetensors weights are loaded, and never with ``trust_remote_code``.

    Args:
        base_model: A local model folder or a Hub id already in the local cache.
        quantization: "nf4" (default), "fp4", "int8", or None for full precision.
        compute_dtype: "auto", "float32", "bfloat16" or "float16" (see :func:`resolve_compute_dtype`).
        device: "auto", "cpu", "cuda" or "cuda:N".
        quant_storage: Storage dtype of 4-bit weights: None for uint8, "compute" for the compute
            dtype (what FSDP needs).

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``, ready for :func:`attach_lora`.

    Raises:
        ModelError: The folder is missing, holds no safetensors weights, or fails to load.

    """
    from transformers import AutoModelForCausalLM

    if quantization is not None:
        import_bitsandbytes()  # transformers would import it, printing a notice about an optional package
    dev = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, dev)
    tokenizer = load_tokenizer(base_model)
    # On the CPU, loading frees hundreds of large quantization temporaries: hand them back at once.
    loading = heap_returned_while() if dev.type == "cpu" else contextlib.nullcontext()
    with loading:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(base_model),
                quantization_config=quantization_config(
                    quantization, dtype, dtype if quant_storage == "compute" else torch.uint8
                ),
                dtype=dtype,
                device_map={"": dev},
                use_safetensors=True,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(
                f"cannot load the base model {base_model!s} ({type(exc).__name__}: {exc}). It must be a local "
                "folder (or cached Hub id) with config.json and *.safetensors weights; convert .bin weights first"
            ) from None
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
    one such view keeps the whole mapping, and every page of it that loading read, resident: on
    the SmolLM2-135M shape that is 560 MB of RSS for a model whose 4-bit weights take 170 MB.
    Copying those few tensors lets the mapping go.

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


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Return the distinct leaf names of the linear layers in ``model`` (4-bit and 8-bit included)."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_target_modules(model: torch.nn.Module, targets: str | list[str]) -> str | list[str]:
    """Turn ``lora_target_modules`` into what peft expects, checking that every name matches.

    Args:
        model: The base model.
        targets: "attention" (the q/k/v/o projections), "all-linear", or a list of module names.

    Raises:
        ModelError: A name matches no module; the message lists the linear modules that exist.

    """
    available = linear_module_names(model)
    if targets == "all-linear":
        return "all-linear"
    if targets == "attention":
        wanted = ATTENTION_PROJECTIONS["llama"]
        found = [n for n in wanted if n in available]
        if not found:
            raise ModelError(
                f"lora_target_modules='attention' found none of {wanted} in this model; "
                f"pass a list chosen from its linear modules: {available}"
            )
        return found
    names = [targets] if isinstance(targets, str) else list(targets)
    missing = [n for n in names if n not in available]
    if missing:
        raise ModelError(
            f"lora_target_modules {missing} match no module in this model; its linear modules are {available}"
        )
    return names


def attach_lora(model: Any, config: Any) -> Any:
    """Freeze the base, enable gradient checkpointing if asked, and wrap it with LoRA adapters.

    Args:
        model: A model from :func:`load_model`.
        config: A :class:`~alpaca_lora.config.FinetuneConfig` (lora_* fields, gradient_checkpointing).

    Returns:
        A ``peft.PeftModel`` whose only trainable parameters are the LoRA weights (kept in fp32).

    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = resolve_target_modules(model, config.lora_target_modules)
    # The non-reentrant kind recomputes a layer only as far as its backward needs: it stops after the
    # last saved activation, so the MLP's down projection (whose 4-bit backward needs only the weight)
    # is not recomputed (30 of 60 down_proj calls per micro-batch on the 30-layer SmolLM2-135M shape).
    # Measured on that shape, 666-token packed
    # micro-batches, 9 interleaved rounds of 3: 4% less time than the re-entrant kind, the same
    # gradients, a training-step peak about 100 MB higher, and a whole-run peak within 25 MB.
    gc_kwargs = {"use_reentrant": False}
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    # Under FSDP the norms must keep the storage dtype of the 4-bit weights (one dtype per FSDP
    # unit), so skip prepare_model_for_kbit_training, which casts them to fp32.
    if quantized and not getattr(config, "fsdp", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if getattr(config, "fused_lora", False):
        from alpaca_lora.lora_layer import register_fused_layers

        register_fused_layers(lora, model, targets)
    torch.manual_seed(config.seed)  # LoRA A is random: make it reproducible
    peft_model = get_peft_model(model, lora)
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if n_trainable == 0:
        raise ModelError("LoRA attached no trainable parameters; check lora_target_modules")
    return peft_model


@contextlib.contextmanager
def checkpointing_paused(model: torch.nn.Module) -> Iterator[None]:
    """Run the layers without gradient checkpointing inside the block (for no-grad forwards).

    A no-grad forward (evaluation, generation) has nothing to recompute, so the checkpoint wrappers
    would only add their bookkeeping. The layers' own flags are restored on exit.
    """
    paused = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in paused:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in paused:
            m.gradient_checkpointing = True


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts (4-bit weights counted as stored elements x 2)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # two 4-bit values per stored byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
