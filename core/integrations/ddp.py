"""DistributedDataParallel communication hooks over ``dispatcher.all_reduce``.

    model = DDP(model)
    model.register_comm_hook(None, ddp.allreduce_hook)        # or bf16_compress_hook / fp16_compress_hook

Each hook has torch's signature ``hook(state, bucket) -> torch.futures.Future[Tensor]``: ``state`` is
the process group to reduce over (None: the default group), ``bucket`` a
``torch.distributed.GradBucket``. ``allreduce_hook`` averages the bucket's flat gradient buffer with
``all_reduce(op="avg")``, which DDP's default hook also computes (a sum of contributions divided by
the world size); the dispatcher tunes each bucket's dispatch key in lockstep on every rank, so every
rank picks the same kernel and gets bitwise identical gradients. The compress hooks halve the bytes
sent, as torch's ``bf16_compress_hook`` / ``fp16_compress_hook`` do: the buffer is cast with
``dispatcher.precision_cast`` (round to nearest even), averaged in the narrow dtype, and widened back
exactly into the buffer. Gradients past the narrow dtype's range become inf there, as with torch's hooks.

A bucket of a dtype the op cannot reduce raises ``InvalidInput`` before any communication; DDP builds
the same buckets on every rank, so every rank raises and none is left waiting in a collective.

CPU buckets are reduced while the backward pass goes on, as DDP's default reduction is: the hook
hands the bucket to a thread of its own and returns a future that thread completes. The thread
reduces over a private copy of the group (same ranks, same backend, made on the hook's first call),
so its collectives, the dispatcher's own (lockstep tuning) included, never interleave with those DDP
or the program issue on the group meanwhile (``find_unused_parameters``
all-reduces its map of used parameters right after the last bucket's hook returns). One thread per
group runs the buckets in the order the hooks were called, which DDP keeps the same on every rank.
Since DDP builds the same buckets on every rank (it checks the parameters' shapes across ranks when it
wraps the model), the private group is vouched for (``core.distributed.vouch``): all_reduce skips its
ranks' call check there, one small collective per bucket.
CUDA buckets are still reduced on the calling thread, before the hook returns: a second thread would
need the stream the gradients were written on, and no GPU was at hand to measure that path.
"""
# No ``from __future__ import annotations``: DDP's register_comm_hook compares the hook's annotations
# with the objects dist.GradBucket and torch.futures.Future[torch.Tensor], and refuses strings.
import os
import queue
import threading
from typing import Any, Callable

import torch
import torch.distributed as dist

from core import distributed
from core.errors import InvalidInput

REDUCIBLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COMPRESSIBLE = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _buffer(hook: str, bucket: dist.GradBucket, allowed: tuple[torch.dtype, ...]) -> torch.Tensor:
    buffer = bucket.buffer()
    if buffer.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise InvalidInput(f"ddp.{hook}: argument 'bucket': expected a gradient bucket of dtype {names}, got "
                           f"{str(buffer.dtype).removeprefix('torch.')} (bucket {bucket.index()}, parameters of that "
                           f"dtype); register no hook for this model, or keep those parameters in a supported dtype")
    return buffer


class _Lane:
    """Where one process group's CPU buckets are reduced: a private copy of the group and one thread
    that runs the hooks' reductions on it, first come first served, completing each hook's future."""

    def __init__(self, group: Any) -> None:
        self.group = dist.new_group(ranks=dist.get_process_group_ranks(group), backend=dist.get_backend(group),
                                    use_local_synchronization=True)  # only the group's own ranks take part
        # It carries DDP's buckets alone, the same on every rank in the same order: all_reduce's call
        # check (a collective per bucket) has nothing to find on it.
        distributed.vouch(self.group)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="switchyard-ddp-hook", daemon=True).start()

    def submit(self, job: Callable[[Any], torch.Tensor]) -> torch.futures.Future[torch.Tensor]:
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self._jobs.put((job, fut))
        return fut

    def _run(self) -> None:
        while True:
            job, fut = self._jobs.get()
            try:
                value = job(self.group)
            except BaseException as e:  # noqa: BLE001 - DDP re-raises it where it waits on the future
                fut.set_exception(e)
            else:
                fut.set_result(value)


_lanes: dict[Any, _Lane] = {}  # a process group -> its lane (the group object is the key: kept alive)
_lanes_lock = threading.Lock()


def _forget_lanes() -> None:
    """In a forked child: none of the parent's threads came along (nor may its lock be free)."""
    global _lanes_lock
    _lanes.clear()
    _lanes_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_lanes)


def _on_lane(state: Any, buffer: torch.Tensor, job: Callable[[Any], torch.Tensor]) -> torch.futures.Future[torch.Tensor]:
    """``job(group)`` on the lane of ``state``'s group (its future completes later), or here, done, for
    CUDA buckets and a world of one."""
    group = distributed.resolve_group(state)
    if buffer.device.type != "cpu" or group is None or distributed.world_size(group) == 1:
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(job(state))
        return fut
    lane = _lanes.get(group)
    if lane is None:
        with _lanes_lock:
            lane = _lanes.get(group)
            if lane is None:
                lane = _lanes[group] = _Lane(group)
    return lane.submit(job)


def allreduce_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The bucket's gradients averaged over ``state`` (a process group, or None for the default group)."""
    from core import dispatcher

    buffer = _buffer("allreduce_hook", bucket, REDUCIBLE)
    return _on_lane(state, buffer, lambda group: dispatcher.all_reduce(buffer, op="avg", group=group))


def _compressed(hook: str, state: Any, bucket: dist.GradBucket, dtype: torch.dtype) -> torch.futures.Future[torch.Tensor]:
    from core import dispatcher

    buffer = _buffer(hook, bucket, COMPRESSIBLE)

    def job(group: Any) -> torch.Tensor:
        narrow = buffer if buffer.dtype == dtype else dispatcher.precision_cast(buffer, dtype=dtype).y
        buffer.copy_(dispatcher.all_reduce(narrow, op="avg", group=group))  # widening is exact
        return buffer

    return _on_lane(state, buffer, job)


def bf16_compress_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """``allreduce_hook`` with the gradients sent as bfloat16 (cast by ``dispatcher.precision_cast``)."""
    return _compressed("bf16_compress_hook", state, bucket, torch.bfloat16)


def fp16_compress_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """``allreduce_hook`` with the gradients sent as float16 (cast by ``dispatcher.precision_cast``)."""
    return _compressed("fp16_compress_hook", state, bucket, torch.float16)


# DDP refuses a hook whose __name__ is "bf16_compress_hook" unless CUDA with NCCL >= 2.10 is present: a
# guard for torch's own hook, which needs NCCL's bfloat16 all_reduce. Ours reduces through whichever
# kernel the dispatcher chose (gloo included), so it goes by another name.
bf16_compress_hook.__name__ = bf16_compress_hook.__qualname__ = "switchyard_bf16_compress_hook"
