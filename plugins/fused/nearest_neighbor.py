"""Fused k-nearest-neighbour search: blocked brute force (C++ on the CPU, Triton on CUDA) and a C++ kd-tree.

``fused``: a running top-k per query while database tiles stream past, the [M, N] distance matrix
never materialised; candidates come from the BLAS product on centred data (or, at D <= 8, from the
direct formula) and are re-ranked exactly within a proven rounding margin (``csrc/nearest_neighbor.cpp``);
on CUDA the Triton kernel selects and the torch backend's code re-ranks and certifies
(``triton/nearest_neighbor.py``). ``fused-kdtree``: median-split kd-tree, built and searched in one
C++ call, for low dimension. Both order equal distances by index and return the direct formula's
distances rounded once to the input dtype.
"""
from __future__ import annotations

import torch

from core.ops.nearest_neighbor import KnnResult, raise_non_finite, verify_finite
from plugins.fused import _build
from registry import Kernel

OP = "nearest_neighbor"
DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32,)
MAX_K_CUDA = 64  # the Triton kernel's MAX_K, repeated so this module imports without triton
# Beyond this dimension a kd-tree's plane bound rarely beats the k-th distance: it visits nearly every
# leaf and only adds overhead to brute force (Weber et al., VLDB 1998, put the crossover near 10-20).
KDTREE_MAX_D = 16


def nearest_neighbor(queries: torch.Tensor, database: torch.Tensor, *, k: int, metric: str) -> KnnResult:
    """Blocked brute force with a running top-k and exact re-ranking (C++ OpenMP, or Triton on CUDA).
    Checks the data itself (``checks_data``): the C++ call sees whether every input is finite. The C++
    searches are called through pybind11 (``_build.module``: about 1.8 us less a call than torch.ops)."""
    if queries.device.type == "cuda":
        from plugins.fused.triton import nearest_neighbor as tri

        verify_finite(queries, database)
        return tri.nearest_neighbor(queries, database, k=k, metric=metric)
    dist, idx, finite = _build.module(OP).nearest_neighbor_brute(queries, database, k, metric == "ip")
    if not finite:
        raise_non_finite(queries, database)
    return KnnResult(dist, idx)


def nearest_neighbor_kdtree(queries: torch.Tensor, database: torch.Tensor, *, k: int, metric: str) -> KnnResult:
    """kd-tree (median split on the widest dimension, leaves of 16) built and searched in one C++ call."""
    dist, idx, finite = _build.module(OP).nearest_neighbor_kdtree(queries, database, k)
    if not finite:
        raise_non_finite(queries, database)
    return KnnResult(dist, idx)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _brute_check(queries: torch.Tensor, database: torch.Tensor, *, k: int, metric: str) -> list[str]:
    reasons = []
    if queries.device.type == "cuda":
        if queries.dtype not in CUDA_DTYPES:
            reasons.append(f"dtype {_name(queries.dtype)} on CUDA: its Triton kernel takes "
                           f"{[_name(d) for d in CUDA_DTYPES]}")
        if k > MAX_K_CUDA:
            reasons.append(f"k={k} on CUDA: its Triton kernel keeps at most {MAX_K_CUDA} neighbours per query "
                           "(twice that many candidates live in registers)")
        reason = _build.triton_reason()
    else:
        reason = _build.unavailable_reason(OP)
    if reason:
        reasons.append(reason)
    return reasons


def _kdtree_check(queries: torch.Tensor, database: torch.Tensor, *, k: int, metric: str) -> list[str]:
    reasons = []
    if metric != "l2":
        reasons.append(f"metric {metric!r}: the kd-tree prunes by Euclidean distance to a splitting plane; "
                       "it serves 'l2' only")
    D = database.shape[1]
    if D > KDTREE_MAX_D:
        reasons.append(f"D={D}: a kd-tree is for low dimension (D <= {KDTREE_MAX_D}); above it visits nearly "
                       "every leaf")
    reason = _build.unavailable_reason(OP)
    if reason:
        reasons.append(reason)
    return reasons


KERNELS = [
    Kernel(op=OP, backend="fused", fn=nearest_neighbor, devices={"cpu", "cuda"}, dtypes=set(DTYPES), priority=30,
           check=_brute_check, checks_data=True,
           description="blocked brute force, running top-k per query, BLAS tiles on centred data (direct "
                       "formula at D <= 8), exact re-rank within a proven margin: C++ OpenMP on the CPU, "
                       "Triton on CUDA"),
    Kernel(op=OP, backend="fused-kdtree", fn=nearest_neighbor_kdtree, devices={"cpu"}, dtypes=set(DTYPES),
           priority=30, check=_kdtree_check, checks_data=True,
           description="median-split kd-tree (leaves of 16) with incremental cell distances, built and "
                       "searched in one C++ call, OpenMP over queries (l2, D <= 16)"),
]
