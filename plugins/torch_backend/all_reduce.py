"""All-reduce in torch.distributed: the library collective per tensor, and the ring algorithm on point-to-point ops.

Both work on a contiguous copy of each tensor, so the caller's tensors are never written. ``avg`` of a
floating tensor divides each contribution by the world size before summing (as NCCL's PreMulSum
does), so an average whose magnitude fits the dtype never overflows on the way.
"""
from __future__ import annotations

from typing import Any

import torch

from core import distributed
from core.ops.all_reduce import as_list, like_input
from registry import Kernel


def contribution(t: torch.Tensor, op: str, n: int) -> torch.Tensor:
    """A fresh contiguous copy of ``t`` to reduce in place; for avg, already divided by ``n``."""
    if op == "avg" and n > 1:
        return t.detach().div(n).contiguous()  # a new tensor, rounded once per element; copied again only if strided
    return t.detach().clone(memory_format=torch.contiguous_format)


def library(tensors: Any, *, op: str, group: Any) -> Any:
    """``torch.distributed.all_reduce`` on a copy of each tensor, one collective after another."""
    import torch.distributed as dist

    n = distributed.world_size(group)
    group = distributed.resolve_group(group)
    outs = []
    for t in as_list(tensors):
        out = contribution(t, op, n)
        if n > 1 and out.numel():  # every rank holds the same shapes, so every rank skips together
            dist.all_reduce(out, op=distributed.reduce_op(op), group=group)
        outs.append(out)
    return like_input(tensors, outs)


# -- the ring -------------------------------------------------------------------------------------

def _combine(op: str, mine: torch.Tensor, incoming: torch.Tensor) -> None:
    if op in ("sum", "avg"):
        mine.add_(incoming)
    elif op == "prod":
        mine.mul_(incoming)
    elif op == "max":
        torch.maximum(mine, incoming, out=mine)
    else:
        torch.minimum(mine, incoming, out=mine)


def ring_all_reduce(buf: torch.Tensor, op: str, group: Any) -> None:
    """All-reduce a flat contiguous tensor in place by the ring algorithm.

    Reduce-scatter, then all-gather, each n - 1 steps around the ring (Patarasuk and Yuan, "Bandwidth
    optimal all-reduce algorithms for clusters of workstations", JPDC 2009): every rank sends and
    receives 2 (n - 1) / n of the data, the bandwidth optimum. The n chunks come from
    ``tensor_split``, so a size not divisible by n (or smaller than n: empty chunks, skipped on both
    ends) is fine. Each chunk is finished on one rank and then copied around, so every rank ends
    bitwise identical.

    Every receive is posted up front (the reduce-scatter's into scratch, the all-gather's straight
    into their chunks), because a point-to-point message costs a rendezvous that would otherwise sit
    on the critical path. That is safe: a chunk's all-gather copy can only arrive after the chunk was
    finished, which needs this rank's partial sum of it to have been sent and received.
    """
    n = distributed.world_size(group)
    if n == 1 or buf.numel() == 0:
        return
    import torch.distributed as dist

    me = distributed.rank(group)
    right = distributed.global_rank(group, (me + 1) % n)
    left = distributed.global_rank(group, (me - 1) % n)
    chunks = buf.tensor_split(n)
    sends: list[Any] = []

    def send(chunk: torch.Tensor, tag: int) -> None:
        if chunk.numel():
            sends.append(dist.isend(chunk, dst=right, group=group, tag=tag))

    def receive(into: torch.Tensor, tag: int) -> Any:
        return dist.irecv(into, src=left, group=group, tag=tag) if into.numel() else None

    # Reduce-scatter: at step s, send chunk me - s and fold the left's partial chunk me - s - 1 in;
    # afterwards chunk me + 1 holds every contribution.
    targets = [chunks[(me - s - 1) % n] for s in range(n - 1)]
    scratch = torch.empty(sum(t.numel() for t in targets), dtype=buf.dtype, device=buf.device)
    incoming = scratch.split([t.numel() for t in targets])
    reduce_requests = [receive(into, s) for s, into in enumerate(incoming)]
    # All-gather: at step s, receive the finished chunk me - s (and pass it on at step s + 1).
    gather_requests = [receive(chunks[(me - s) % n], n + s) for s in range(n - 1)]
    send(chunks[me], 0)
    for s, request in enumerate(reduce_requests):
        if request is not None:
            request.wait()
        _combine(op, targets[s], incoming[s])
        if s + 1 < n - 1:
            send(targets[s], s + 1)
    send(chunks[(me + 1) % n], n)
    for s, request in enumerate(gather_requests):
        if request is not None:
            request.wait()
        if s + 1 < n - 1:
            send(chunks[(me - s) % n], n + s + 1)
    for request in sends:
        request.wait()


def ring(tensors: Any, *, op: str, group: Any) -> Any:
    """The ring algorithm on the group's point-to-point operations, one tensor after another."""
    n = distributed.world_size(group)
    group = distributed.resolve_group(group)
    outs = []
    for t in as_list(tensors):
        out = contribution(t, op, n)
        ring_all_reduce(out.view(-1), op, group)
        outs.append(out)
    return like_input(tensors, outs)


def _ring_check(tensors: Any, *, op: str, group: Any) -> list[str]:
    items = as_list(tensors)
    if items and items[0].device.type == "cuda" and distributed.backend(group) == "gloo":
        return ["gloo's point-to-point operations take CPU tensors only (use a nccl group for CUDA tensors)"]
    return []


KERNELS = [
    Kernel(op="all_reduce", backend="torch", fn=library, devices={"cpu", "cuda"}, priority=10,
           description="torch.distributed.all_reduce on a copy of each tensor"),
    Kernel(op="all_reduce", backend="ring", fn=ring, devices={"cpu", "cuda"}, priority=5, check=_ring_check,
           description="ring reduce-scatter + all-gather on isend/irecv, chunked by tensor_split"),
]
