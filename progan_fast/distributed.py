"""Data-parallel training under ``torchrun``: who this process is, and the few collectives we use.

``torchrun --nproc_per_node=N -m progan_fast.train ...`` starts N processes (ranks) with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. :func:`from_environment` reads
them; a plain ``python -m progan_fast.train`` is the one-rank :data:`SINGLE` world, which uses no
collective at all.

How the ranks share one global batch (the choice every other module relies on):

- Every rank draws the *global* batch's randomness -- the N batch indices, the N latents, the
  penalty's N mixing factors -- from the same seed in the same order, then keeps its slice with
  :meth:`World.take`: rank ``r`` of ``R`` keeps rows ``r, r + R, r + 2R, ...``. So R ranks see
  exactly the images and latents one process with the same global batch sees, and their RNG
  states stay equal (a checkpoint written by rank 0 resumes any number of ranks).
- The slice is interleaved, not contiguous, because of the minibatch-stddev layer: it groups
  sample ``i`` of an N batch with the samples ``i mod (N / group)`` apart. Taking every R-th
  sample maps each rank's local groups onto whole global groups, as long as the per-rank batch
  is a multiple of the group size.
- Gradients are averaged by ``DistributedDataParallel`` (the mean of R per-rank means of equal
  size is the global mean), so R ranks take the same optimizer steps as one process.

Backends: gloo on the CPU; NCCL for CUDA tensors plus gloo for the small CPU-side messages (the
stop flag, broadcasting the run folder's name), as ``"cpu:gloo,cuda:nccl"``.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

#: How long a rank waits in a collective before giving up. Rank 0 alone decodes an image folder
#: into the data cache while the others wait at a barrier, which can take a while for a large set
#: (the default is 10 minutes for NCCL).
TIMEOUT = timedelta(minutes=60)


class DistributedError(Exception):
    """A bad torchrun setup (``str(e)`` is the one-line message)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files, prints and draws progress bars."""
        return self.rank == 0

    def take(self, global_rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor drawn for the whole global batch (rows ``rank::size``)."""
        return global_rows if self.size == 1 else global_rows[self.rank::self.size]

    # ----- collectives (each a no-op in a one-rank world) ----------------------------------------

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=_cpu_group())

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (a CPU message, no device sync)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
        return bool(t.item())

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=_cpu_group())
        return box[0]

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place, on its own device."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise max of ``t`` over the ranks, in place, on its own device."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


SINGLE = World()

_CPU_GROUP = None


def _cpu_group():
    """The gloo group for CPU tensors (the default group itself when that is gloo)."""
    return _CPU_GROUP


def from_environment(environ=os.environ) -> World:
    """The world torchrun describes in the environment, or :data:`SINGLE` outside torchrun."""
    try:
        size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DistributedError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers (they are set by torchrun)") from None
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise DistributedError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local_rank}")
    return World(rank, size, local_rank) if size > 1 else SINGLE


def device_for(world: World, requested: str) -> torch.device:
    """The training device of this rank: ``cuda:LOCAL_RANK`` on a GPU, else the CPU.

    ``requested`` is ``--device`` (auto, cpu or cuda); ``auto`` picks CUDA when PyTorch sees one.
    """
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedError("--device cuda was asked for, but PyTorch sees no CUDA device (use --device cpu or auto)")
    if not world.distributed:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise DistributedError(
            f"rank {world.rank} has LOCAL_RANK {world.local_rank}, but this machine shows only {count} GPU(s); "
            f"start at most {count} processes per node (torchrun --nproc_per_node={count})")
    return torch.device("cuda", world.local_rank)


def init(world: World, device: torch.device) -> None:
    """Join the process group (gloo on the CPU, NCCL + gloo on GPUs). A no-op for one rank."""
    global _CPU_GROUP
    if not world.distributed or dist.is_initialized():
        _CPU_GROUP = dist.group.WORLD if dist.is_initialized() else None
        return
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; run without torchrun")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise DistributedError(f"{name} is not set: start multi-process training with torchrun "
                                   f"(e.g. torchrun --standalone --nproc_per_node=2 -m progan_fast.train ...)")
    # DDP warns when a gradient's strides differ from its bucket's only in a size-1 dimension (D's
    # last layer, [1, C, 1, 1]): the same memory layout, nothing to fix.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=TIMEOUT, device_id=device)
        _CPU_GROUP = dist.new_group(backend="gloo", timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
        _CPU_GROUP = dist.group.WORLD


def shutdown(world: World) -> None:
    global _CPU_GROUP
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None


def end_process(code: int) -> NoReturn:
    """End this rank's process with ``code`` now, without the interpreter's finalization.

    Gloo's worker threads outlive ``destroy_process_group`` (PyTorch 2.13 does not join them), and
    the last reference to a finished collective is sometimes theirs. Releasing it frees the
    collective's tensors, which takes the GIL; if the main thread has begun finalizing by then,
    Python ends the worker thread inside C++ code that must not unwind, and the process aborts
    with "terminate called without an active exception" after training succeeded. The core dump
    shows ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork`` -> ``TensorImpl::decref_pyobject``
    -> ``take_gil`` -> ``pthread_exit`` (pytorch/pytorch#179291 describes the same). A barrier
    before leaving does not prevent it: the barrier's work holds the earlier collectives and is
    released the same way.

    Every file the run wrote is closed by the time this is called, so the finalization has
    nothing left to do: flush the standard streams and ``_exit``.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)
