"""Several processes, one run: torch.distributed under ``torchrun`` or ``accelerate launch``.

Both launchers start one process per device and tell each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`init_distributed`
reads them, joins the process group (nccl on CUDA, gloo on the CPU) and returns a :class:`Dist`
that the training loop asks for its rank, its shard of a step and the collectives it needs. A
plain ``python`` process gets a single-process :class:`Dist` whose collectives do nothing.

How the run stays the same run on every rank (the training loop and :mod:`alpaca_lora.train.strategy`
do the rest):

- every rank computes the same global order of micro-batches (a pure function of seed and
  epoch); rank ``r`` of ``W`` takes micro-batches ``r, r + W, ...`` of each optimizer step, so a
  step covers exactly the records a single process would train on;
- the loss is divided by the label-token count of the whole step, summed over ranks, and the
  LoRA gradients are summed over ranks once per step (one flat all-reduce of the trainable
  gradients, which are small), so every rank holds the single-process gradient and takes the
  same optimizer step;
- a failure on one rank stops every rank: work between collectives runs inside :meth:`Dist.guard`,
  which catches the error, tells the other ranks through a one-number all-reduce, and raises
  on all of them (the failing rank re-raises its own error, the others a ``DistributedError``
  naming it). A rank that dies without raising (killed, out of memory) is caught by the
  launcher, which stops its siblings, or at the latest by the process-group timeout
  (``FinetuneConfig.ddp_timeout``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from alpaca_lora.errors import ConfigError, DistributedError

logger = logging.getLogger(__name__)

T = TypeVar("T")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class LaunchEnv:
    """Where the launcher put this process.

    Attributes:
        rank: Global index of this process, 0 .. world_size - 1.
        world_size: Number of processes in the run.
        local_rank: Index of this process on its machine (its GPU index on CUDA).

    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read the launch from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun and accelerate launch set them).

    Args:
        environ: The environment to read; ``os.environ`` by default.

    Returns:
        The launch; ``LaunchEnv()`` (rank 0 of 1) when no launcher set ``WORLD_SIZE``.

    Raises:
        ConfigError: The variables are set but not consistent (the message names them).

    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return LaunchEnv()
    values: dict[str, int] = {}
    for name in _ENV:
        text = env.get(name, "0" if name != "WORLD_SIZE" else "")
        try:
            values[name] = int(text)
        except ValueError:
            raise ConfigError(f"environment variable {name}={text!r} is not an integer; launch with torchrun "
                              "or accelerate launch, or unset WORLD_SIZE/RANK/LOCAL_RANK for one process") from None
    launch = LaunchEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise ConfigError(f"inconsistent launch environment RANK={launch.rank} WORLD_SIZE={launch.world_size} "
                          f"LOCAL_RANK={launch.local_rank}: need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return launch


class Dist:
    """The view one process has of the run: rank, device and the collectives the training loop uses.

    Build it with :func:`init_distributed`. With one process every collective is a no-op.
    """

    def __init__(self, launch: LaunchEnv, device: torch.device, backend: str | None, owns_group: bool) -> None:
        self.rank, self.world_size, self.local_rank = launch.rank, launch.world_size, launch.local_rank
        self.device, self.backend, self._owns_group = device, backend, owns_group

    @property
    def enabled(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files, logs and shows progress."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world_size={self.world_size}, device={self.device}, backend={self.backend})"

    # ---- data ------------------------------------------------------------------------------------

    def shard(self, items: Sequence[T]) -> list[T]:
        """Return this rank's share of ``items``: elements ``rank, rank + world_size, ...``."""
        return list(items[self.rank :: self.world_size])

    # ---- collectives ---------------------------------------------------------------------------

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """All-reduce ``values`` by sum (in float64, so token counts stay exact) and return them."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over ranks in place (one flat all-reduce).

        A parameter without a gradient on this rank (it trained on no micro-batch this step)
        counts as zeros, so every rank calls the collective the same way.
        """
        if not self.enabled or not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Copy rank 0's values of ``params`` to every rank (the initial LoRA weights)."""
        if not self.enabled:
            return
        for p in params:
            torch.distributed.broadcast(p.data, src=0)

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run local work so that a failure on any rank stops every rank.

        The block must not call collectives itself. On leaving it every rank all-reduces one
        number: which ranks failed. A failing rank re-raises its own exception; the others raise
        :class:`~alpaca_lora.errors.DistributedError` naming the failed rank. Without this a rank
        would wait in the next collective for a peer that is gone, until the timeout.

        Args:
            what: What the block does, for the error message ("training step 12", "save").

        """
        if not self.enabled:
            yield
            return
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:  # KeyboardInterrupt too: the peers must not wait for this rank
            error = exc
        # MAX over ranks of (world_size - rank) for failed ranks gives the lowest failed rank.
        flag = torch.tensor([self.world_size - self.rank if error is not None else 0], device=self._comm_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if error is not None:
            raise error
        if int(flag.item()):
            failed = self.world_size - int(flag.item())
            raise DistributedError(
                f"process rank {failed} of {self.world_size} failed during {what} (its error is printed above, "
                f"from rank {failed}); every rank stops. Fix that error and launch again"
            )

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def close(self) -> None:
        """Leave the process group if :func:`init_distributed` created it."""
        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self._owns_group = False


def init_distributed(device: str = "auto", timeout_s: float = 1800.0, environ: Mapping[str, str] | None = None) -> Dist:
    """Join the process group the launcher set up (or return a single-process :class:`Dist`).

    Args:
        device: ``FinetuneConfig.device``. With several processes "auto" and "cuda" mean this
            process's GPU, ``cuda:LOCAL_RANK``; "cpu" trains on the CPU with gloo.
        timeout_s: How long a collective waits for a missing rank before failing (seconds).
        environ: The environment to read; ``os.environ`` by default.

    Returns:
        A :class:`Dist`; call :meth:`Dist.close` when the run ends.

    Raises:
        ConfigError: An inconsistent launch environment, or a fixed ``cuda:N`` device under a
            multi-process launch.

    """
    from alpaca_lora.model.load import resolve_device

    launch = launch_env(environ)
    if launch.world_size == 1:
        return Dist(launch, resolve_device(device), None, owns_group=False)
    if device.startswith("cuda:"):
        raise ConfigError(f"device={device!r} with {launch.world_size} processes: each process trains on the GPU "
                          "of its LOCAL_RANK; use device='auto' (or 'cuda', or 'cpu')")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if launch.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={launch.local_rank} but only {torch.cuda.device_count()} GPUs are "
                              "visible; launch at most that many processes per machine (--nproc_per_node)")
        torch.cuda.set_device(launch.local_rank)
        dev = torch.device("cuda", launch.local_rank)
    else:
        dev = resolve_device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    owns = not torch.distributed.is_initialized()
    if owns:
        torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                             rank=launch.rank, world_size=launch.world_size,
                                             **({"device_id": dev} if use_cuda else {}))
    else:  # a caller (an Accelerator, a notebook) already joined; use its group and backend
        backend = torch.distributed.get_backend()
    dist = Dist(launch, dev, backend, owns_group=owns)
    logger.info("distributed: %s", dist)
    return dist


def global_step_shard(dist: Dist, micro_batches: list[list[int]], pad: bool = False) -> list[tuple[list[int], bool]]:
    """Return this rank's micro-batches of one optimizer step, each with whether it counts.

    Args:
        dist: The run's :class:`Dist`.
        micro_batches: The step's micro-batches in the global order (identical on every rank).
        pad: Give every rank the same number of passes (FSDP needs each rank in every forward):
            a rank short of one repeats the step's first micro-batch with weight 0.

    Returns:
        ``(indices, counts)`` pairs; a pass with ``counts=False`` contributes no loss or gradient.

    """
    mine = [(mb, True) for mb in dist.shard(micro_batches)]
    if pad:
        per_rank = -(-len(micro_batches) // dist.world_size)
        mine += [(micro_batches[0], False)] * (per_rank - len(mine))
    return mine


def check_world_size(dist: Dist, batch_size: int, micro_batch_size: int) -> None:
    """Refuse a global batch that cannot be split evenly over the processes.

    Raises:
        ConfigError: ``batch_size / micro_batch_size`` micro-batches per step is not a multiple of
            the number of processes; the message gives batch sizes that work.

    """
    accum = batch_size // micro_batch_size
    if accum % dist.world_size:
        per = micro_batch_size * dist.world_size
        raise ConfigError(
            f"batch_size={batch_size} with micro_batch_size={micro_batch_size} gives {accum} micro-batches per "
            f"optimizer step, which cannot be split evenly over {dist.world_size} processes; use a batch_size "
            f"that is a multiple of micro_batch_size x processes = {per} "
            f"(e.g. batch_size={max(per, batch_size // per * per)}), "
            f"or launch a number of processes that divides {accum}"
        )
