"""Reference k-nearest-neighbour search: float64 numpy brute force, and the textbook kd-tree.

Both evaluate the direct formula in float64, round it once to the inputs' dtype, and order by that
rounded value and then by index: the contract's "equal distances, lower index first" read literally.
"""
from __future__ import annotations

import heapq

import numpy as np
import torch

from core.ops.nearest_neighbor import KnnResult
from core.spec import bucket
from registry import Kernel

OP = "nearest_neighbor"
_BLOCK_ELEMENTS = 1 << 20  # (query, database point) pairs evaluated at once by the brute force
LEAF_SIZE = 16
# The pure-Python kd-tree takes about a second near these sizes (worst case, high dimension: every leaf).
KDTREE_MAX_N, KDTREE_MAX_PAIRS = 1 << 16, 1 << 18


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def _rounded(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float64 values rounded to the inputs' dtype (and held in float64 again)."""
    if dtype == torch.float32:
        with np.errstate(over="ignore"):  # beyond float32's range the rounded value is inf, as intended
            return values.astype(np.float32).astype(np.float64)
    return values


def _result(dist: np.ndarray, idx: np.ndarray, like: torch.Tensor) -> KnnResult:
    return KnnResult(torch.from_numpy(dist).to(device=like.device, dtype=like.dtype),
                     torch.from_numpy(idx).to(device=like.device))


def nearest_neighbor(queries: torch.Tensor, database: torch.Tensor, *, k: int, metric: str) -> KnnResult:
    """Every distance in float64, each row's k smallest by (distance, index): the obvious definition."""
    Q, X = _numpy(queries), _numpy(database)
    (M, D), N = Q.shape, X.shape[0]
    dist = np.zeros((M, k))
    idx = np.zeros((M, k), dtype=np.int64)
    rows = max(1, _BLOCK_ELEMENTS // N)
    XT = np.ascontiguousarray(X.T)
    for r0 in range(0, M, rows):
        q = Q[r0:r0 + rows]
        cost = np.zeros((q.shape[0], N))
        for d in range(D):  # the direct formula, one coordinate at a time
            if metric == "l2":
                cost += (q[:, d, None] - XT[d][None, :]) ** 2
            else:
                cost -= q[:, d, None] * XT[d][None, :]  # most similar first
        cost = _rounded(cost, queries.dtype)
        kth = np.partition(cost, k - 1, axis=1)[:, k - 1]
        for r, row in enumerate(cost):
            # Every point at or below the k-th smallest cost (all of its ties), in index order; a stable
            # sort by cost then puts equal costs lower index first.
            near = np.flatnonzero(row <= kth[r])
            order = near[np.argsort(row[near], kind="stable")][:k]
            idx[r0 + r] = order
            dist[r0 + r] = row[order]
    return _result(dist if metric == "l2" else -dist, idx, queries)


# -- kd-tree -----------------------------------------------------------------------------------------

class _Node:
    """A kd-tree node: a leaf holds database indices; an inner node a split (dim, value) and two children."""

    __slots__ = ("ids", "dim", "value", "left", "right")

    def __init__(self, ids: np.ndarray | None = None, dim: int = -1, value: float = 0.0,
                 left: "_Node | None" = None, right: "_Node | None" = None) -> None:
        self.ids, self.dim, self.value, self.left, self.right = ids, dim, value, left, right


def _build(X: np.ndarray, ids: np.ndarray) -> _Node:
    """Split at the median along the dimension of largest spread, down to leaves of LEAF_SIZE points."""
    pts = X[ids]
    spread = pts.max(axis=0) - pts.min(axis=0)
    dim = int(np.argmax(spread))
    if len(ids) <= LEAF_SIZE or spread[dim] == 0:
        return _Node(ids=ids)
    mid = len(ids) // 2
    order = np.argpartition(pts[:, dim], mid)
    # Left: coordinates <= value; right: >= value.
    return _Node(dim=dim, value=float(pts[order[mid], dim]), left=_build(X, ids[order[:mid]]),
                 right=_build(X, ids[order[mid:]]))


def _search(node: _Node, X: np.ndarray, q: np.ndarray, k: int, heap: list[tuple[float, int]], dtype: torch.dtype) -> None:
    """Near side first; the far side only when the splitting plane is no farther than the k-th best.

    ``heap`` is a bounded max-heap of (-distance, -index): its root is the worst of the k best."""
    if node.ids is not None:
        d = _rounded(((X[node.ids] - q) ** 2).sum(axis=1), dtype)
        for dist, i in zip(d.tolist(), node.ids.tolist()):
            if len(heap) < k:
                heapq.heappush(heap, (-dist, -i))
            elif (dist, i) < (-heap[0][0], -heap[0][1]):
                heapq.heapreplace(heap, (-dist, -i))
        return
    diff = q[node.dim] - node.value
    near, far = (node.left, node.right) if diff < 0 else (node.right, node.left)
    _search(near, X, q, k, heap, dtype)
    # Every point beyond the plane is at least diff^2 away, and rounding keeps that order.
    plane = float(_rounded(np.array([diff * diff]), dtype)[0])
    if len(heap) < k or plane <= -heap[0][0]:
        _search(far, X, q, k, heap, dtype)


def nearest_neighbor_kdtree(queries: torch.Tensor, database: torch.Tensor, *, k: int, metric: str) -> KnnResult:
    """The kd-tree of Friedman, Bentley and Finkel (1977), exact, squared L2, in plain Python."""
    Q, X = _numpy(queries), _numpy(database)
    root = _build(X, np.arange(X.shape[0]))
    dist = np.zeros((Q.shape[0], k))
    idx = np.zeros((Q.shape[0], k), dtype=np.int64)
    for r, q in enumerate(Q):
        heap: list[tuple[float, int]] = []
        _search(root, X, q, k, heap, queries.dtype)
        best = sorted((-d, -i) for d, i in heap)
        dist[r] = [d for d, _ in best]
        idx[r] = [i for _, i in best]
    return _result(dist, idx, queries)


def _kdtree_check(queries: torch.Tensor, database: torch.Tensor, *, k: int, metric: str) -> list[str]:
    reasons = []
    if metric != "l2":
        reasons.append(f"metric {metric!r}: the kd-tree prunes by Euclidean distance to a splitting plane, "
                       "which bounds nothing for inner products; it serves 'l2' only")
    M, N = bucket(queries.shape[0]), bucket(database.shape[0])
    if N > KDTREE_MAX_N or M * N > KDTREE_MAX_PAIRS:
        reasons.append(f"M={queries.shape[0]}, N={database.shape[0]}: pure Python would take over a second "
                       f"(it serves up to N={KDTREE_MAX_N} and M*N={KDTREE_MAX_PAIRS}, by power-of-two buckets)")
    return reasons


KERNELS = [
    Kernel(op=OP, backend="reference", fn=nearest_neighbor, devices={"cpu", "cuda"}, priority=-100,
           description="float64 numpy brute force, stable sort per row: the executable definition"),
    Kernel(op=OP, backend="reference-kdtree", fn=nearest_neighbor_kdtree, devices={"cpu"}, priority=-90,
           check=_kdtree_check,
           description="median-split kd-tree in plain Python, near side first, heapq top-k (l2 only, small inputs)"),
]
