"""Forward gradients over torch.distributed: ranks share tangent seeds and exchange jvps, not gradients.

Every rank regenerates the same tangents from the shared seed and step counter, so a step is fully
described by its k jvps. Two modes (``Communicator(mode)``, handed to ``ForwardGradient``):

- ``tangent``: all ranks see the same batch; rank r computes the jvps of its share of the k tangents
  and the ranks all-gather them. Every rank then applies the same update. No gradient is sent.
- ``data``: rank r holds its shard of the global batch and computes all k jvps of its local loss;
  with weight perturbation one all-reduce of the k jvps (weighted by shard size) gives the jvps of
  the global loss. With activity perturbation the weight gradients depend on each sample, so the
  ranks all-reduce the gradients instead (n numbers, as data-parallel backprop).

``bytes_sent`` counts what this rank puts on the wire: for an all-gather its piece times (N - 1)
peers, for an all-reduce 2 (N - 1) / N times the tensor (the ring algorithm).

Launch with ``torchrun --standalone --nproc_per_node=N -m frog train ... --distributed tangent``;
on several machines use torchrun's ``--nnodes``, ``--node_rank`` and ``--rdzv_endpoint`` arguments.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

MODES = ("tangent", "data")


class DistributedError(RuntimeError):
    """A rank died, hung past the timeout, or disagrees with the others."""


def init_from_environment(device: str, timeout_seconds: float) -> None:
    """Join the process group described by torchrun's environment (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--distributed needs a launcher: run `torchrun --nproc_per_node=N -m frog train ...`")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    except Exception as error:
        raise DistributedError(f"could not join the process group within {timeout_seconds:g} s: {error}") from error


class Communicator:
    """The collectives of one distributed estimator; ``rank``, ``world`` and ``bytes_sent``."""

    def __init__(self, mode: str, group: dist.ProcessGroup | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown distributed mode {mode!r}; choose one of {', '.join(MODES)}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed is not initialized: call init_process_group first (or use torchrun)")
        self.mode, self.group = mode, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.bytes_sent = 0
        self.shard_weight = 1.0  # data mode: B_r / B of the current step

    # -- what this rank computes ----------------------------------------------------------------
    def rows(self, num_tangents: int) -> list[int] | None:
        """The tangent rows this rank computes: its contiguous share in tangent mode, all in data mode."""
        if self.mode != "tangent":
            return None
        if num_tangents < self.world:
            raise ValueError(f"tangent mode needs at least one tangent per rank: k = {num_tangents} < {self.world} ranks")
        return _share(num_tangents, self.world)[self.rank]

    def shard(self, batch_size: int) -> slice:
        """Data mode: this rank's contiguous slice of a global batch (sizes differ by at most one)."""
        bounds = [sum(len(s) for s in _share(batch_size, self.world)[:r]) for r in range(self.world + 1)]
        return slice(bounds[self.rank], bounds[self.rank + 1])

    # -- exchanges ------------------------------------------------------------------------------
    def combine_jvps(self, jvps: torch.Tensor, num_tangents: int) -> torch.Tensor:
        """Tangent mode: all-gather the shares into (k, ...). Data mode with scalar losses: the
        shard-weighted all-reduce. Data mode with per-sample jvps (activity): unchanged (local)."""
        if self.mode == "tangent":
            shares = _share(num_tangents, self.world)
            longest = max(len(s) for s in shares)
            padded = torch.zeros(longest, *jvps.shape[1:], dtype=jvps.dtype, device=jvps.device)
            padded[: jvps.shape[0]] = jvps
            pieces = [torch.empty_like(padded) for _ in range(self.world)]
            self._guard(lambda: dist.all_gather(pieces, padded, group=self.group))
            self.bytes_sent += jvps.numel() * jvps.element_size() * (self.world - 1)
            return torch.cat([piece[: len(share)] for piece, share in zip(pieces, shares, strict=False)])
        if jvps.dim() == 1:
            return self.all_reduce_mean(jvps)
        return jvps

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """sum over ranks of shard_weight * tensor (the global mean when shards weigh B_r / B)."""
        total = tensor * self.shard_weight
        self._guard(lambda: dist.all_reduce(total, group=self.group))
        self.bytes_sent += int(2 * (self.world - 1) / self.world * total.numel() * total.element_size())
        return total

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all ranks."""
        total = tensor.clone()
        self._guard(lambda: dist.all_reduce(total, group=self.group))
        self.bytes_sent += int(2 * (self.world - 1) / self.world * total.numel() * total.element_size())
        return total

    def check_same(self, **settings: object) -> None:
        """Raise DistributedError naming every setting on which some rank differs from rank 0."""
        gathered: list[dict[str, object] | None] = [None] * self.world
        self._guard(lambda: dist.all_gather_object(gathered, settings, group=self.group))
        reference = gathered[0]
        assert reference is not None  # all_gather_object filled every entry
        differences = [f"rank {r} has {name}={theirs[name]!r} but rank 0 has {value!r}"
                       for r, theirs in enumerate(gathered) for name, value in reference.items()
                       if theirs is not None and theirs.get(name) != value]
        if differences:
            raise DistributedError("ranks disagree: " + "; ".join(differences))

    def barrier(self) -> None:
        self._guard(lambda: dist.barrier(group=self.group))

    def _guard(self, collective) -> None:
        try:
            collective()
        except DistributedError:
            raise
        except Exception as error:
            raise DistributedError(
                f"rank {self.rank}: a collective failed ({str(error).splitlines()[0]}); another rank died, "
                "hung past --dist-timeout, or was started with other settings"
            ) from error


def _share(count: int, parts: int) -> list[list[int]]:
    """Split range(count) into ``parts`` contiguous pieces whose sizes differ by at most one."""
    base, extra = divmod(count, parts)
    out, start = [], 0
    for r in range(parts):
        size = base + (1 if r < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def unwrap_replicas(model: nn.Module) -> tuple[nn.Module, Communicator | None]:
    """The module inside a ``DistributedDataParallel`` or ``DataParallel`` wrapper (frog runs its passes on
    it, not through the wrapper), and for DDP over several ranks a data-mode communicator over DDP's
    process group with equal shards: the ranks average their jvps (weight perturbation, k numbers) or
    estimates (activity, local learning), so every replica takes the same step, as DDP averages gradients."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if dist.get_world_size(model.process_group) == 1:
            return model.module, None
        communicator = Communicator("data", model.process_group)
        communicator.shard_weight = 1.0 / communicator.world
        return model.module, communicator
    if isinstance(model, nn.DataParallel):
        return model.module, None
    return model, None
