"""Reference all-reduce: gather every rank's contribution, reduce in float64 (integers in int64) in rank order."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core import distributed
from core.ops.all_reduce import as_list, like_input
from registry import Kernel

_COMBINE = {"sum": np.add, "avg": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum}


def _gather(items: list[torch.Tensor], group: Any) -> list[list[torch.Tensor]]:
    """Every rank's copy of ``items`` (index [rank][i]), moved through one all_gather of their bytes."""
    n = distributed.world_size(group)
    if n == 1:
        return [[t.detach().cpu() for t in items]]
    import torch.distributed as dist

    device = items[0].device if items else torch.device("cpu")
    chunks = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in items]
    mine = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=device)
    if mine.numel() == 0:  # every rank has the same structure, so every rank skips together
        return [[t.detach().cpu() for t in items] for _ in range(n)]
    everyone = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(everyone, mine, group=distributed.resolve_group(group))
    out = []
    for flat in everyone:
        pieces = flat.cpu().split([c.numel() for c in chunks])
        # clone: a piece's offset in the buffer need not be aligned for its dtype
        out.append([p.clone().view(t.dtype).reshape(t.shape) for p, t in zip(pieces, items)])
    return out


def _numpy(t: torch.Tensor) -> np.ndarray:
    wide = torch.float64 if t.is_floating_point() else torch.int64
    return t.to(wide).numpy()


def all_reduce(tensors: Any, *, op: str, group: Any) -> Any:
    """Reduce rank 0's contribution with rank 1's, then rank 2's, ... in float64; cast back once."""
    items = as_list(tensors)
    contributions = _gather(items, group)
    n = len(contributions)
    combine = _COMBINE[op]
    outs = []
    for i, t in enumerate(items):
        acc = _numpy(contributions[0][i]).copy()
        with np.errstate(over="ignore"):  # integers wrap around, as they do in every kernel
            for rank in range(1, n):
                acc = combine(acc, _numpy(contributions[rank][i]))
        if op == "avg":
            acc = acc / n
        outs.append(torch.from_numpy(np.asarray(acc)).reshape(t.shape).to(device=t.device, dtype=t.dtype))
    return like_input(tensors, outs)


KERNELS = [
    Kernel(op="all_reduce", backend="reference", fn=all_reduce, devices={"cpu", "cuda"}, priority=-100,
           description="all_gather of every contribution's bytes, then numpy float64 (int64) in rank order: the oracle"),
]
