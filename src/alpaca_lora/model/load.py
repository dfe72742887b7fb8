"""Load a base model (4-bit NF4 by default) with its tokenizer, checking the folder first, and attach LoRA adapters."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alpaca_lora import files
from alpaca_lora.errors import ConfigError, ModelError, shown
from alpaca_lora.kernels.cpu_memory import heap_returned_while
from alpaca_lora.model.bnb_import import import_bitsandbytes

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
    A folder that asks to run its own code is refused (never ``trust_remote_code``), and so is a
    tokenizer whose special tokens have ids outside its vocabulary.

    Raises:
        ModelError: No tokenizer loads, the folder carries custom code, there is no EOS token, or a
            special token's id lies outside the vocabulary.

    """
    from transformers import AutoTokenizer

    folder = files.local_model_folder(base_model)
    if folder is not None:
        files.refuse_special_files(folder)
        files.refuse_custom_code(folder)
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
    tokenizer.padding_side = "right"  # training pads right; generate() switches to left (mistake 5)
    return tokenizer


SPECIAL_TOKENS = ("pad", "eos", "bos", "unk")


def check_special_tokens(tokenizer: Any, source: str | Path) -> None:
    """Refuse a tokenizer whose pad, EOS, BOS or unknown token has an id outside ``0 .. len(tokenizer) - 1``.

    A hand-edited ``tokenizer.json`` or ``tokenizer_config.json`` can give a special token such an
    id; the collator would pad with it and the embedding lookup fail deep inside training.

    Raises:
        ModelError: Naming ``source``, the token, its id and the files to repair.

    """
    size = len(tokenizer)
    for kind in SPECIAL_TOKENS:
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and not 0 <= token_id < size:
            token = getattr(tokenizer, f"{kind}_token", None)
            raise ModelError(
                f"the tokenizer of {source!s} gives its {kind} token {shown(token, 60)} the id {token_id}, outside "
                f"its vocabulary of {size:,} ids (0 to {size - 1:,}); repair tokenizer.json, tokenizer_config.json "
                f"and special_tokens_map.json so that the {kind} token is one of the vocabulary's tokens"
                + (", or remove the pad token (a missing one is set to UNK or EOS)" if kind == "pad" else "")
            )


def check_vocabulary(tokenizer: Any, embedding_rows: int, source: str | Path) -> None:
    """Refuse a tokenizer with more token ids than the model has embedding rows.

    Raises:
        ModelError: Naming ``source`` and both sizes; a token id past the embedding would fail the
            embedding lookup (an IndexError, or a device-side assert on a GPU) once the data holds it.

    """
    if len(tokenizer) > embedding_rows:
        raise ModelError(
            f"the tokenizer of {source!s} has {len(tokenizer):,} tokens but the model's embedding has "
            f"{embedding_rows:,} rows (config.json vocab_size); pass the tokenizer the model was trained with, "
            "or resize the embedding first (model.resize_token_embeddings(len(tokenizer)), then save_pretrained)"
        )


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
    checked before any weight is read (:func:`check_base_folder`), and the load itself must fill
    every tensor of the model from the files: a damaged or mismatched folder is a ``ModelError``,
    never a half-loaded model.

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
        ModelError: The folder is missing, asks to run its own code, holds no (or damaged)
            safetensors weights, its config.json does not describe its weights, its tokenizer
            does not fit the embedding, or the load fails.

    """
    from transformers import AutoModelForCausalLM

    if quantization is not None:
        import_bitsandbytes()  # transformers would import it, printing a notice about an optional package
    dev = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, dev)
    folder = files.local_model_folder(base_model)
    embedding_rows = check_base_folder(folder) if folder is not None else None
    tokenizer = load_tokenizer(base_model)
    if embedding_rows is not None:
        check_vocabulary(tokenizer, embedding_rows, base_model)
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
    _check_loading_info(info, base_model)
    if embedding_rows is None:
        check_vocabulary(tokenizer, model.get_input_embeddings().num_embeddings, base_model)
    model.config.use_cache = False
    if dev.type == "cpu":
        copied = copy_file_backed_tensors(model)
        if copied:
            logger.debug("copied %d tensors out of the mapped weight files", copied)
    return model, tokenizer


def _check_loading_info(info: dict[str, Any], base_model: str | Path) -> None:
    """Refuse a load that left model tensors unfilled or dropped tensors of the files.

    transformers initialises a missing tensor randomly and only logs it; a dropped one means the
    model built is not the one saved.
    """
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing or unexpected or mismatched:
        found = "; ".join(f"{what} {len(names)}: {shown(names[:5], 300)}" for what, names in (
            ("missing from the weight files", missing), ("in the files but not in the model", unexpected),
            ("of another shape", mismatched)) if names)
        raise ModelError(f"the weights of {base_model!s} do not match its config.json ({found}); the folder is "
                         "damaged or its files come from different models: download or copy it again")


def check_base_folder(folder: Path) -> int | None:
    """Check a local base-model folder before any weight is loaded; return its embedding rows.

    In order: no device or FIFO among its files, no custom code (``auto_map``), ``config.json`` a
    JSON object, every safetensors header intact (a truncated download is caught here), and the
    model config.json describes (built on the meta device, so no memory is allocated whatever sizes
    it claims) needs no more weights, and no other shapes, than the files hold. Costs a read of the
    headers, not of the weights.

    Args:
        folder: The local folder of the base model.

    Returns:
        Rows of the model's input embedding (what the tokenizer must fit), or None when the config
        describes no input embedding.

    Raises:
        ModelError: Naming the file at fault and the fix.

    """
    files.refuse_special_files(folder)
    files.refuse_custom_code(folder)
    config_file = folder / "config.json"
    config = files.read_json(config_file, expect=dict, fix="restore the config.json that came with the weights")
    weights = _weight_files(folder)
    shapes: dict[str, list[int]] = {}
    for file in weights:
        shapes.update(files.tensor_shapes(file))
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int) and not 0 <= layers <= len(shapes):
        raise ModelError(f"{config_file} says num_hidden_layers={layers}, but the weight files hold {len(shapes)} "
                         "tensors in all; restore the config.json that came with the weights")
    meta = _meta_model(folder, config_file)
    if "quantization_config" not in config:  # a pre-quantized checkpoint stores packed tensors: sizes differ
        _check_weights_cover(meta, shapes, config_file, weights)
    embedding = meta.get_input_embeddings()
    return getattr(embedding, "num_embeddings", None)


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files a load reads: those the index names when there is one, else all; headers checked."""
    present = files.check_weight_files(folder)
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        index = files.read_json(index_file, fix="restore the index that came with the weight files")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelError(f"{index_file} has no weight_map of file names; restore the index that came with "
                             "the weight files")
        named = sorted({folder / v for v in weight_map.values()})
        absent = [p.name for p in named if p not in present]
        if absent:
            raise ModelError(f"{index_file} names weight files that are not in {folder}: {shown(absent)}; "
                             "download the missing shards")
        return named
    if not present:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ModelError(
            f"{folder} holds no *.safetensors weights" + (f" (only {shown(pickles)})" if pickles else "")
            + "; only safetensors weights are loaded, since a pickle file can run code when read. Convert .bin "
            "weights with transformers' save_pretrained(safe_serialization=True) in a trusted environment"
        )
    return present


def _meta_model(folder: Path, config_file: Path) -> torch.nn.Module:
    """The model config.json describes, built on the meta device (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the real load reports what matters; this one is only measured
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure to build the model is the config's
        raise ModelError(f"{config_file} does not describe a causal LM transformers can build "
                         f"({type(exc).__name__}: {shown(str(exc), 300)}); restore the config.json that came with "
                         "the weights") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _check_weights_cover(meta: torch.nn.Module, shapes: dict[str, list[int]], config_file: Path,
                         weights: list[Path]) -> None:
    """Refuse a config whose model needs more (or other-shaped) tensors than the weight files hold."""
    needed, seen = {}, set()
    for name, tensor in meta.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # tied weights are stored once
            seen.add(id(tensor))
            needed[name] = list(tensor.shape)
    other_shape = [f"{n}: {shapes[n]} in the files, {s} by config.json" for n, s in needed.items()
                   if n in shapes and shapes[n] != s]
    in_files = sum(math.prod(s) for s in shapes.values())
    in_model = sum(math.prod(s) for s in needed.values())
    if other_shape or in_model > in_files:
        absent = [n for n in needed if n not in shapes]
        detail = (f"{len(other_shape)} of another shape: {shown(other_shape[:3], 300)}" if other_shape else
                  f"{in_model:,} weights needed, {in_files:,} in the files"
                  + (f"; absent: {shown(absent[:5], 300)}" if absent else ""))
        raise ModelError(f"{config_file} does not describe the weights in {shown([w.name for w in weights])} "
                         f"({detail}); the weight files are incomplete or config.json belongs to another model: "
                         "download the folder again or restore its own config.json")


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
        if _is_linear(module):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def adapter_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers a LoRA adapter may go on: every linear layer but the output head.

    The output head (``lm_head``) is left out: it is tied to the input embedding in many models,
    the fused loss reads its weight directly, and peft saves an adapter on it only as a full copy.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for full_name, module in model.named_modules():
        if _is_linear(module) and module is not head:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_target_modules(model: torch.nn.Module, targets: str | list[str]) -> str | list[str]:
    """Turn ``lora_target_modules`` into what peft expects, checking that every name is an adaptable layer.

    Args:
        model: The base model.
        targets: "attention" (the q/k/v/o projections), "all-linear", or a list of module names.

    Raises:
        ModelError: A name is the output head, the embedding or another non-linear module, or
            matches no module; the message lists the names that can be adapted.

    """
    available = adapter_module_names(model)
    if targets == "all-linear":
        return "all-linear"  # peft's "all-linear" leaves the output head out too
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
    kinds = {full.rsplit(".", 1)[-1]: type(m).__name__ for full, m in model.named_modules() if full}
    problems = []
    for name in (n for n in names if n not in available):
        if name in linear_module_names(model):
            problems.append(f"{name!r} is the output head, not a decoder layer")
        elif name in kinds:
            problems.append(f"{name!r} is not a linear layer (it is a {kinds[name]})")
        else:
            problems.append(f"{shown(name, 60)} matches no module")
    if problems:
        raise ModelError(
            f"lora_target_modules: {'; '.join(problems)}. LoRA adapters go on the linear layers of the decoder "
            f"blocks; this model's are {available} (or pass 'attention' or 'all-linear')"
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
        from alpaca_lora.kernels.lora_layer import register_fused_layers

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
