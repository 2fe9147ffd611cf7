"""k-nearest-neighbour search in torch: chunked brute force with exact re-ranking, CPU and CUDA.

Candidates are selected with the matrix-product expansion ``|x|^2 - 2 q.x`` on data centred at the
database mean (distances do not change; the cancellation does), keeping ``k + max(k, 16)`` per query
while database chunks stream past. The candidates are then re-ranked by the direct formula in
float64, and each row is certified: every point left out had a product value whose proven rounding
bound (``margin``) still puts it beyond the k-th re-ranked distance. The rare row that cannot be
certified (many points tied within rounding) is recomputed by the direct formula over the whole
database. Extra memory: one [rows, chunk] tile of about 4M entries, the candidates, and a float64
gather of [rows, candidates, D]; never [M, N].

The fused Triton kernel replaces only the candidate selection: it shares ``candidates_per_query``,
``margin``, ``norms`` and ``finish`` (re-rank, certify, recompute) with this module.
"""
from __future__ import annotations

import torch

from core.ops.nearest_neighbor import KnnResult
from registry import Kernel

OP = "nearest_neighbor"
TILE_ELEMENTS = 1 << 22   # one [query rows, database rows] tile of the product
GATHER_ELEMENTS = 1 << 21  # float64 elements gathered at once when re-ranking
GROUP = 16  # columns per group in the two-stage top-k
QUERY_ROWS = 256  # queries per tile
_UNIT = {"highest": 2.0 ** -24, "high": 2.0 ** -11, "medium": 2.0 ** -8}  # float32 matmul precision settings


def candidates_per_query(k: int, N: int) -> int:
    return min(N, k + max(k, 16))


def product_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """The unit roundoff of a matrix product in ``dtype`` under the process's matmul settings (TF32 or
    bfloat16 passes make float32 products much coarser, and the margin must know it)."""
    if dtype == torch.float64:
        return 2.0 ** -53
    u = _UNIT.get(torch.get_float32_matmul_precision(), 2.0 ** -24)
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u = max(u, 2.0 ** -11)
    return u


def margin(metric: str, D: int, u: float, qnorm: torch.Tensor, xmax: float) -> torch.Tensor:
    """A bound on |selection value - re-ranked value| per query, for centred norms |q_c| <= qnorm and
    |x_c| <= xmax: l2 (D + 6) u (|q_c| + |x_c|)^2, ip (D + 4) u |q| |x| to first order (centring, the
    product, the norms, the subtraction, the final rounding), doubled."""
    if metric == "l2":
        return 2.0 * (D + 6) * u * (qnorm + xmax) ** 2
    return 2.0 * (D + 4) * u * qnorm * xmax


def norms(t: torch.Tensor, u: float) -> torch.Tensor:
    """float64 row norms, inflated to cover the norm of the rounded rows."""
    return t.to(torch.float64).pow(2).sum(dim=1).sqrt() * (1.0 + 4.0 * t.shape[1] * u)


def select_candidates(q: torch.Tensor, x: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidate indices [M, c], the largest selection value kept per row [M] in float64, margin [M]).

    The selection value is ``|x_c|^2 - 2 q_c.x_c`` (l2; the true distance minus ``|q_c|^2``, which the
    returned bound already adds back) or ``-q.x`` (ip); every point not kept has a value >= the
    row's largest kept one. Where the product can overflow, a value that did (inf, or inf - inf = NaN)
    bounds nothing, so it is read as -inf: kept first, and a row that keeps only such values has a
    bound of -inf, which no certification passes (``finish`` then scans it exactly)."""
    M, D = q.shape
    N = x.shape[0]
    c = candidates_per_query(k, N)
    u = product_roundoff(q.dtype, q.device)
    mean = x.mean(dim=0, dtype=torch.float64).to(q.dtype) if metric == "l2" else None
    # Few rows, wide chunks: torch's topk costs mostly per row, so the widest tiles select cheapest.
    rows = min(M, QUERY_ROWS, max(1, TILE_ELEMENTS // D))
    chunk = max(c, min(TILE_ELEMENTS // rows, max(1, TILE_ELEMENTS // D)))
    cand = torch.empty(M, c, dtype=torch.int64, device=q.device)
    worst = torch.empty(M, dtype=torch.float64, device=q.device)
    qnorm = torch.empty(M, dtype=torch.float64, device=q.device)
    xmax = 0.0
    big = float(torch.finfo(q.dtype).max) / 4  # (|q_c| + |x_c|)^2 below this: no value can overflow
    buffer = torch.empty(rows, chunk, dtype=q.dtype, device=q.device)
    for r0 in range(0, M, rows):
        qc = q[r0:r0 + rows] - mean if mean is not None else q[r0:r0 + rows]
        qnorm[r0:r0 + rows] = norms(qc, u)
        qmax = float(qnorm[r0:r0 + rows].max())
        qn = qc.to(torch.float64).pow(2).sum(dim=1) if mean is not None else None
        best_v = best_i = None
        for j0 in range(0, N, chunk):
            xc = x[j0:j0 + chunk] - mean if mean is not None else x[j0:j0 + chunk]
            if r0 == 0:
                xmax = max(xmax, float(norms(xc, u).max()))
            # A reused output: a fresh 16 MB tile per chunk costs more in page faults than the product.
            out = buffer[:qc.shape[0]] if xc.shape[0] == chunk and qc.shape[0] == rows else None
            if mean is not None:
                v = torch.addmm(xc.pow(2).sum(dim=1)[None, :], qc, xc.t(), alpha=-2, out=out)
            else:
                v = torch.mm(qc, xc.t(), out=out).neg_()
            if not (qmax + xmax) ** 2 < big:  # xmax covers this chunk: r0 == 0 has just added it
                v = torch.nan_to_num_(v, nan=-torch.inf, posinf=-torch.inf)
            v, pos = _smallest(v, c)
            pos += j0
            if best_v is not None:  # merge the chunk's best with the running best: [rows, 2c] at most
                v, pos = torch.cat([best_v, v], dim=1), torch.cat([best_i, pos], dim=1)
                v, keep = torch.topk(v, c, dim=1, largest=False)
                pos = pos.gather(1, keep)
            best_v, best_i = v, pos
        assert best_v is not None and best_i is not None
        cand[r0:r0 + rows] = best_i
        worst[r0:r0 + rows] = best_v.max(dim=1).values.to(torch.float64) + (qn if qn is not None else 0.0)
    return cand, worst, margin(metric, D, u, qnorm, xmax)


def _smallest(v: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) of the c smallest per row (any c of them on ties). Wide rows go through group
    minima first: the c smallest values lie in the c groups with the smallest minima, so one cheap
    pass leaves c * GROUP columns for topk. Group w is the columns w, w + W, w + 2W, ... (W = n / GROUP),
    so the minima are an elementwise min of GROUP contiguous slices."""
    rows, n = v.shape
    if n < 4 * c * GROUP:
        return torch.topk(v, min(c, n), dim=1, largest=False)
    W = n // GROUP
    mins = v[:, :W * GROUP].reshape(rows, GROUP, W).amin(dim=1)
    groups = torch.topk(mins, c, dim=1, largest=False).indices
    cols = (groups[:, :, None] + W * torch.arange(GROUP, device=v.device)).reshape(rows, -1)
    if W * GROUP < n:
        cols = torch.cat([cols, torch.arange(W * GROUP, n, device=v.device).expand(rows, -1)], dim=1)
    vals, keep = torch.topk(v.gather(1, cols), c, dim=1, largest=False)
    return vals, cols.gather(1, keep)


def _costs(q: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, metric: str) -> torch.Tensor:
    """The direct formula in float64, rounded to the inputs' dtype: l2 distance, or -q.x for ip."""
    D = q.shape[1]
    out = torch.empty(ids.shape, dtype=q.dtype, device=q.device)
    rows = max(1, GATHER_ELEMENTS // max(1, ids.shape[1] * D))
    for r0 in range(0, ids.shape[0], rows):
        qs = q[r0:r0 + rows, None, :].to(torch.float64)
        xs = x[ids[r0:r0 + rows]].to(torch.float64)
        v = (qs - xs).pow(2).sum(-1) if metric == "l2" else -(qs * xs).sum(-1)
        out[r0:r0 + rows] = v.to(q.dtype)
    return out


def _by_cost_then_index(cost: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids, perm = ids.sort(dim=1)
    cost = cost.gather(1, perm)
    cost, perm = cost.sort(dim=1, stable=True)
    return cost, ids.gather(1, perm)


def rerank(q: torch.Tensor, x: torch.Tensor, cand: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(costs, indices) of the k best candidates by the direct formula, ties by index."""
    cost, ids = _by_cost_then_index(_costs(q, x, cand, metric), cand)
    return cost[:, :k], ids[:, :k]


def certify(cost: torch.Tensor, worst: torch.Tensor, margin_: torch.Tensor, complete: bool) -> torch.Tensor:
    """Bool [M]: rows whose left-out points provably lie beyond the k-th cost (strictly, after rounding)."""
    if complete:
        return torch.ones(cost.shape[0], dtype=torch.bool, device=cost.device)
    kth = cost[:, -1].to(torch.float64)
    u = float(torch.finfo(cost.dtype).eps)
    return worst - margin_ > kth + u * kth.abs() + torch.finfo(cost.dtype).tiny


def exact_scan(q: torch.Tensor, x: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The direct formula against every database point, one query at a time in bounded chunks."""
    N, D = x.shape
    chunk = max(k, GATHER_ELEMENTS // D)
    costs, ids = [], []
    for row in q:
        best_c = best_i = None
        r = row.to(torch.float64)
        for j0 in range(0, N, chunk):
            xs = x[j0:j0 + chunk].to(torch.float64)
            c = ((xs - r).pow(2).sum(dim=1) if metric == "l2" else -(xs @ r)).to(q.dtype)
            i = torch.arange(j0, j0 + xs.shape[0], device=q.device)
            if best_c is not None:  # earlier chunks hold lower indices: a stable sort keeps them first
                c, i = torch.cat([best_c, c]), torch.cat([best_i, i])
            c, perm = c.sort(stable=True)
            best_c, best_i = c[:k], i[perm[:k]]
        costs.append(best_c)
        ids.append(best_i)
    return torch.stack(costs), torch.stack(ids)


def finish(q: torch.Tensor, x: torch.Tensor, cand: torch.Tensor, worst: torch.Tensor, margin_: torch.Tensor, k: int,
           metric: str) -> KnnResult:
    """Re-rank the candidates, certify each row, recompute the rows that fail, and return the result."""
    cost, ids = rerank(q, x, cand, k, metric)
    ok = certify(cost, worst, margin_, complete=cand.shape[1] >= x.shape[0])
    redo = (~ok).nonzero()[:, 0]
    if redo.numel():
        cost[redo], ids[redo] = exact_scan(q[redo], x, k, metric)
    return KnnResult(cost if metric == "l2" else -cost, ids)


def nearest_neighbor(queries: torch.Tensor, database: torch.Tensor, *, k: int, metric: str) -> KnnResult:
    """Chunked product selection, exact float64 re-ranking, per-row certification."""
    M = queries.shape[0]
    if M == 0:
        return KnnResult(queries.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=queries.device))
    # Not differentiable (the spec declares no grad inputs): plain tensors out, as the other kernels give.
    queries, database = queries.detach(), database.detach()
    cand, worst, margin_ = select_candidates(queries, database, k, metric)
    return finish(queries, database, cand, worst, margin_, k, metric)


KERNELS = [
    Kernel(op=OP, backend="torch", fn=nearest_neighbor, devices={"cpu", "cuda"},
           dtypes={torch.float32, torch.float64}, priority=10,
           description="chunked matmul selection of k + max(k, 16) candidates, float64 re-rank, certified per row"),
]

