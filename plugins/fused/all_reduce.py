"""All-reduce with tensor fusion: pack the list into buckets per dtype, one collective per bucket, unpack.

What PyTorch DDP (gradient buckets, ``bucket_cap_mb``) and Horovod (the fusion buffer,
``HOROVOD_FUSION_THRESHOLD``) do to gradients: many small collectives cost a latency each, one
bucket of them costs one. Buckets are packed in order and each one's collective is started
asynchronously as soon as it is packed, so packing the next bucket overlaps the communication of
the previous ones; the bucket size trades that overlap against the number of collectives, which is
why it is a tuned config rather than a constant.
"""
from __future__ import annotations

from typing import Any

import torch

from core import distributed
from core.ops.all_reduce import as_list, like_input
from plugins.torch_backend.all_reduce import contribution
from registry import Kernel

MB = 1 << 20
BUCKET_MB = (1, 4, 25)


def buckets(items: list[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``items`` grouped per dtype, in order, into buckets of at most ``bucket_bytes``
    (a tensor larger than that gets a bucket of its own). Empty tensors are left out."""
    out: list[list[int]] = []
    open_bucket: dict[torch.dtype, tuple[list[int], int]] = {}
    for i, t in enumerate(items):
        size = t.numel() * t.element_size()
        if size == 0:
            continue
        current, filled = open_bucket.get(t.dtype, ([], 0))
        if current and filled + size > bucket_bytes:
            out.append(current)
            current, filled = [], 0
        current.append(i)
        open_bucket[t.dtype] = (current, filled + size)
    out += [b for b, _ in open_bucket.values() if b]
    return out


def fused(tensors: Any, *, op: str, group: Any, bucket_mb: float) -> Any:
    """Pack, all-reduce each bucket asynchronously, wait, and hand out views of the reduced buckets."""
    import torch.distributed as dist

    items = as_list(tensors)
    n = distributed.world_size(group)
    group = distributed.resolve_group(group)
    outs: list[torch.Tensor | None] = [None] * len(items)
    packed: list[tuple[list[int], torch.Tensor]] = []
    pending = []
    avg = op == "avg" and n > 1  # divided before the sum, as NCCL's PreMulSum does: the average cannot overflow
    for indices in buckets(items, int(bucket_mb * MB)):
        if len(indices) == 1:  # a bucket of one: its contribution, made in one pass
            flat = contribution(items[indices[0]], op, n).view(-1)
        else:  # packed in one pass, each tensor divided on its way in for avg
            first = items[indices[0]]
            flat = torch.empty(sum(items[i].numel() for i in indices), dtype=first.dtype, device=first.device)
            offset = 0
            for i in indices:
                src, end = items[i].detach().reshape(-1), offset + items[i].numel()
                if avg:
                    torch.div(src, n, out=flat[offset:end])
                else:
                    flat[offset:end].copy_(src)
                offset = end
        if n > 1:
            pending.append(dist.all_reduce(flat, op=distributed.reduce_op(op), group=group, async_op=True))
        packed.append((indices, flat))
    for work in pending:
        work.wait()
    for indices, flat in packed:
        for i, piece in zip(indices, flat.split([items[i].numel() for i in indices])):
            outs[i] = piece.view(items[i].shape)
    for i, t in enumerate(items):
        if outs[i] is None:  # an empty tensor
            outs[i] = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return like_input(tensors, outs)


KERNELS = [
    Kernel(op="all_reduce", backend="fused", fn=fused, devices={"cpu", "cuda"}, priority=30,
           configs=tuple({"bucket_mb": mb} for mb in BUCKET_MB),
           description="DDP/Horovod tensor fusion: per-dtype buckets, one async collective each, views back"),
]
