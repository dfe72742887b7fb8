"""How the processes of a run share one optimizer step: full replicas, or FSDP shards.

The training loop asks its :class:`Strategy` for five things and never which kind it has: this
process's micro-batches of a step, the loss divisor, the reduction of a few numbers, the
gradients made whole and clipped, and the adapter gathered for saving. One process is the
replicated strategy with a world of one, whose collectives do nothing.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from alpaca_lora.errors import ConfigError
from alpaca_lora.export.layout import ADAPTER_WEIGHTS
from alpaca_lora.train.distributed import Dist, global_step_shard

logger = logging.getLogger(__name__)

LossFunction = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]
OptimizerFactory = Callable[[list[torch.nn.Parameter]], tuple[torch.optim.Optimizer, Any]]
_SHARDINGS = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


def trainable(model: Any) -> list[torch.nn.Parameter]:
    """The parameters that train (the LoRA weights), in a fixed order."""
    return [p for p in model.parameters() if p.requires_grad]


class Strategy:
    """Every process holds the whole model; gradients are summed over processes once per step.

    Args:
        dist: This process's place in the run.

    """

    name = "replicated"
    writes_checkpoints = True  # resumable checkpoints of this strategy's state can be written
    supports_packing = True

    def __init__(self, dist: Dist) -> None:
        self.dist = dist

    @property
    def is_main(self) -> bool:
        """True on the process that writes files, logs and shows progress."""
        return self.dist.is_main

    def guard(self, what: str) -> Any:
        """Local work after which every process learns whether any failed (see :meth:`Dist.guard`)."""
        return self.dist.guard(what)

    def prepare(self, model: Any, build_optimizer: OptimizerFactory) -> tuple[Any, Any, Any]:
        """Make the processes start equal (rank 0's LoRA weights everywhere); return model, optimizer, scheduler."""
        self.dist.broadcast_parameters(trainable(model))
        return (model, *build_optimizer(trainable(model)))

    def shard(self, micro_batches: list[list[int]]) -> list[tuple[list[int], bool]]:
        """The micro-batches of one step this process runs, each with whether it counts toward the loss."""
        return global_step_shard(self.dist, micro_batches)

    def loss_divisor(self, label_tokens: int) -> float:
        """What each micro-batch's summed loss is divided by before ``backward``: the step's label tokens."""
        return float(max(1, label_tokens))

    def loss_function(self, fused: LossFunction) -> LossFunction:
        """The micro-batch loss to use, given the fused one that works on an unwrapped model."""
        return fused

    def reduce(self, values: Sequence[float]) -> list[float]:
        """Sum ``values`` over the processes (one all-reduce)."""
        return self.dist.sum(values)

    def sync_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Make every process hold the gradient of the whole step (one flat all-reduce)."""
        self.dist.sum_gradients(params)

    def clip(self, model: Any, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the gradients to ``max_norm`` (0 only measures) and return their total norm."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))

    def non_finite_weights(self, model: Any) -> list[str]:
        """Names of the trainable weights holding a NaN or an infinity (empty when all are finite).

        One flag per tensor and a single host sync; names are looked up only on the rare bad path.
        """
        if not self._any_non_finite(trainable(model)):
            return []
        names = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        return names or ["(a weight shard of another process)"]

    def _any_non_finite(self, params: list[torch.nn.Parameter]) -> bool:
        return bool(params) and bool(torch.stack([torch.isfinite(p).all().logical_not() for p in params]).any())

    def gather_adapter(self, model: Any, lora_names: Sequence[str]) -> Callable[[Path], None]:
        """Collect the adapter (a collective for FSDP: every process calls it); return its writer for rank 0."""
        # save_embedding_layers=False: new tokens are saved as their rows (trainable_tokens_delta), never as
        # whole embedding matrices, which peft's "auto" would add once the vocabulary grew
        return lambda folder: model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)


class FullyShardedStrategy(Strategy):
    """Each process holds a shard of every weight (FSDP, as peft's FSDP-QLoRA recipe wraps it).

    FSDP averages gradients over processes inside ``backward``, so the loss divisor is the step's
    label tokens over the world size; every process runs every forward (a short process repeats a
    micro-batch with weight 0). Packing and resumable checkpoints are not supported yet.
    """

    name = "fsdp"
    writes_checkpoints = False
    supports_packing = False

    def prepare(self, model: Any, build_optimizer: OptimizerFactory) -> tuple[Any, Any, Any]:
        """Broadcast the initial LoRA weights, shard the model, and build the optimizer over the shards."""
        self.dist.broadcast_parameters(trainable(model))
        model = wrap_fsdp(model, self.dist)
        return (model, *build_optimizer(trainable(model)))

    def shard(self, micro_batches: list[list[int]]) -> list[tuple[list[int], bool]]:
        """Like the replicated shard, padded so every process runs the same number of forwards."""
        return global_step_shard(self.dist, micro_batches, pad=True)

    def loss_divisor(self, label_tokens: int) -> float:
        """The step's label tokens over the world size (FSDP averages the gradients it reduces)."""
        return max(1, label_tokens) / self.dist.world_size

    def loss_function(self, fused: LossFunction) -> LossFunction:
        """The plain forward of the wrapped model (FSDP must run its own forward to gather shards)."""
        from alpaca_lora.kernels.cross_entropy import forward_losses_sum

        return lambda model, b: forward_losses_sum(model, b["input_ids"], b["attention_mask"], b["labels"])

    def sync_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Nothing to do: FSDP reduced the gradient shards during ``backward``."""

    def clip(self, model: Any, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
        """The norm over all shards, computed by the FSDP model across processes."""
        return float(model.clip_grad_norm_(max_norm if max_norm > 0 else float("inf")))

    def _any_non_finite(self, params: list[torch.nn.Parameter]) -> bool:
        (bad,) = self.dist.sum([float(super()._any_non_finite(params))])  # each process holds a shard
        return bad > 0

    def gather_adapter(self, model: Any, lora_names: Sequence[str]) -> Callable[[Path], None]:
        """Gather the full state on rank 0 (a collective) and return a writer of peft's adapter format."""
        state = full_state_dict(model)
        return lambda folder: save_fsdp_adapter(model.module, state, lora_names, folder)


def choose_strategy(fsdp: bool, dist: Dist, environ: Mapping[str, str] | None = None) -> Strategy:
    """The strategy for ``FinetuneConfig.fsdp``, or FSDP when ``accelerate launch`` was given an FSDP config.

    ``accelerate launch --config_file <FSDP config>`` sets ``ACCELERATE_USE_FSDP=true``; that turns
    FSDP on (and says so in the log) even when the run's settings left ``fsdp`` False.
    """
    env = os.environ if environ is None else environ
    if not fsdp and env.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        logger.info("ACCELERATE_USE_FSDP=%s in the environment (an accelerate FSDP config): training with FSDP",
                    env["ACCELERATE_USE_FSDP"])
        fsdp = True
    return FullyShardedStrategy(dist) if fsdp else Strategy(dist)


def wrap_fsdp(model: Any, dist: Dist, environ: Mapping[str, str] | None = None) -> Any:
    """Shard ``model`` (a peft model) over the ranks with FSDP, as peft's FSDP-QLoRA recipe does.

    Every decoder layer and every LoRA layer becomes its own FSDP unit (peft's
    ``fsdp_auto_wrap_policy``), so each unit holds tensors of one dtype that all train or all stay
    frozen. From an ``accelerate launch`` FSDP config, ``fsdp_sharding_strategy`` and
    ``fsdp_offload_params`` are honoured; the other FSDP settings are fixed here.

    Args:
        model: The peft model, on this rank's device, 4-bit weights stored in the compute dtype.
        dist: The run's :class:`Dist`.
        environ: The environment to read; ``os.environ`` by default.

    Returns:
        The FSDP-wrapped model; build the optimizer from its parameters.

    Raises:
        ConfigError: An FSDP sharding strategy this recipe does not know.

    """
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import CPUOffload, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    env = os.environ if environ is None else environ
    sharding = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    if sharding.isdigit():  # older accelerate versions pass the enum's 1-based number
        sharding = _SHARDINGS[int(sharding) - 1] if 1 <= int(sharding) <= len(_SHARDINGS) else sharding
    if sharding not in _SHARDINGS:
        raise ConfigError(f"FSDP_SHARDING_STRATEGY={sharding!r}: use one of {list(_SHARDINGS)} "
                          "(fsdp_sharding_strategy in the accelerate config)")
    offload = env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
    if not dist.enabled:
        logger.warning("fsdp=True with a single process: nothing to shard over; launch with torchrun or "
                       "accelerate launch and several processes")
    return FSDP(
        model,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),
        sharding_strategy=ShardingStrategy[sharding],
        cpu_offload=CPUOffload(offload_params=offload),
        use_orig_params=False,
        device_id=dist.device,
        limit_all_gathers=True,
    )


def full_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Gather the full (unsharded) state dict of an FSDP model on rank 0, on the CPU.

    A collective: every rank must call it. Ranks other than 0 get an empty dict.
    """
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # offload_to_cpu only from a GPU: on the CPU it frees the storage it is about to read.
    on_gpu = next(model.parameters()).device.type == "cuda"
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=True)):
        return model.state_dict()


def save_fsdp_adapter(peft_model: Any, state: dict[str, torch.Tensor], lora_names: Sequence[str],
                      folder: str | Path) -> None:
    """Write the adapter of an FSDP-wrapped peft model in peft's format (rank 0, after :func:`full_state_dict`).

    peft's ``save_pretrained`` finds the LoRA entries through module names that FSDP changed
    (``_fsdp_wrapped_module``) and would write an empty file; the full state dict keeps the original
    names, so the entries are picked by the parameter names recorded before wrapping.

    Args:
        peft_model: The peft model inside the FSDP wrapper (``fsdp_model.module``).
        state: The full state dict from :func:`full_state_dict`.
        lora_names: Names of the trainable LoRA parameters, taken before FSDP wrapping.
        folder: The output folder.

    """
    from safetensors.torch import save_file

    adapter = "default"
    weights = {name.replace(f".{adapter}", ""): state[name].detach().cpu().contiguous() for name in lora_names}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.copy(peft_model.peft_config[adapter])
    config.inference_mode = True
    config.save_pretrained(str(folder))


@contextmanager
def quiet_replica(dist: Dist) -> Iterator[None]:
    """On ranks other than 0, keep info logs and progress bars off while the block runs; restore them after.

    Warnings and errors still show on every rank. ``TQDM_DISABLE`` quiets the bars of libraries that
    read it (tqdm >= 4.66); transformers' own bars are switched through its logging API.
    """
    if dist.is_main:
        yield
        return
    from transformers.utils import logging as hf_logging

    ours = logging.getLogger("alpaca_lora")
    level, env, bars = ours.level, os.environ.get("TQDM_DISABLE"), hf_logging.is_progress_bar_enabled()
    ours.setLevel(logging.WARNING)
    os.environ["TQDM_DISABLE"] = "1"
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        ours.setLevel(level)
        if env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = env
        if bars:
            hf_logging.enable_progress_bar()
