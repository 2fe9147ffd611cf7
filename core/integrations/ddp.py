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
"""
# No ``from __future__ import annotations``: DDP's register_comm_hook compares the hook's annotations
# with the objects dist.GradBucket and torch.futures.Future[torch.Tensor], and refuses strings.
from typing import Any

import torch
import torch.distributed as dist

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


def _done(value: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(value)
    return fut


def allreduce_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The bucket's gradients averaged over ``state`` (a process group, or None for the default group)."""
    from core import dispatcher

    buffer = _buffer("allreduce_hook", bucket, REDUCIBLE)
    return _done(dispatcher.all_reduce(buffer, op="avg", group=state))


def _compressed(hook: str, state: Any, bucket: dist.GradBucket, dtype: torch.dtype) -> torch.futures.Future[torch.Tensor]:
    from core import dispatcher

    buffer = _buffer(hook, bucket, COMPRESSIBLE)
    narrow = buffer if buffer.dtype == dtype else dispatcher.precision_cast(buffer, dtype=dtype).y
    averaged = dispatcher.all_reduce(narrow, op="avg", group=state)
    buffer.copy_(averaged)  # widening is exact
    return _done(buffer)


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
