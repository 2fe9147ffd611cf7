"""nearest_neighbor: exact k-nearest-neighbour search of queries [M, D] in a database [N, D].

``metric="l2"``: squared Euclidean distance, ascending; ``metric="ip"``: inner product, descending
(most similar first). Returns ``KnnResult(distances [M, k] in the input dtype, indices [M, k] int64)``;
equal distances come lower database index first. Distances are the direct formula ``sum((q - x)**2)``
(or ``sum(q * x)``) rounded to the input dtype, not the cancellation-prone ``|q|^2 - 2 q.x + |x|^2``:
a query equal to a database point gets exactly 0 and that point first, wherever the data lies.

Compare rule (tie-aware, after FAISS's own tests): the distances are within the dtype's rounding of a
float64 evaluation of the returned pairs; in each row they are sorted, equal distances by index; the
true (float64) distances of the returned points match the reference's rank by rank; and within each
group of reference distances equal up to the tolerance the sets of indices match, except the last
group, which may be cut at k. The tolerance is ``2 (D + 3) u d`` for l2 (the direct formula in the
dtype errs by at most ``(D + 3) u d``, u the unit roundoff) and ``2 (D + 2) u sum|q_i x_i|`` for ip,
each plus ``2 (D + 3) u`` times the dtype's smallest normal: below it the dtype's spacing is fixed, so
rounding errs absolutely (a few subnormal spacings), not relatively. Values beyond the dtype's largest
finite value are compared as that value: a distance whose float64 value overflows the dtype may be
returned as inf, and such points tie with one another.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, NamedTuple

import torch

from core.errors import InvalidInput
from core.spec import (Attr, OpSpec, Sample, TensorMeta, Verdict, bucket, device_type, dtype_name, reads_data,
                       require_tensor)

NAME = "nearest_neighbor"
DTYPES = (torch.float32, torch.float64)
METRICS = ("l2", "ip")
SHRINK_N, SHRINK_WORK = 2048, 20_000_000  # validation samples: database points, and M * N * D at most
REFERENCE_WORK = 1 << 24  # up to M * N * max(D, 8) this large, candidates are also validated at full size
PILOT_MIN_QUERIES = 256  # the timing pilot (a sixteenth of the queries) only from this many queries
_ROW_ELEMENTS = 1 << 21  # rows at a time in the compare rule's float64 gathers


class KnnResult(NamedTuple):
    """The op's output: distances [M, k] in the input dtype and indices [M, k] int64."""

    distances: torch.Tensor
    indices: torch.Tensor


_DTYPE_SET = frozenset(DTYPES)
_STRIDED = torch.strided
_DTYPE_STR = {d: dtype_name(d) for d in DTYPES}  # str(torch.dtype) costs a fraction of a microsecond


def _verify(args: tuple[Any, ...], attrs: dict[str, Any]) -> tuple[Any, ...] | None:
    """The rules, then the dispatch key (``_key``'s tuple). The common call (plain tensors, an int k) is
    recognised by a few exact tests from one read of each shape, without building a device object
    (``database.device != queries.device`` alone took about 0.5 us of a small search's hot path); any
    other call, and any broken rule, goes through ``_check_rules``, which names the first broken one."""
    queries, database = args
    k = attrs["k"]
    if (queries.__class__ is torch.Tensor and database.__class__ is torch.Tensor and k.__class__ is int
            and queries.layout is _STRIDED and database.layout is _STRIDED):
        qs, xs, dt = queries.shape, database.shape, queries.dtype
        if (len(qs) == 2 and len(xs) == 2 and dt in _DTYPE_SET and database.dtype is dt and qs[1] == xs[1] >= 1
                and 1 <= k <= xs[0] and attrs["metric"] in METRICS):
            cpu = queries.is_cpu
            if cpu and database.is_cpu:
                M, N = qs[0], xs[0]
                return ("cpu", _DTYPE_STR[dt], M if M <= 1 else 1 << (M - 1).bit_length(),
                        1 << (N - 1).bit_length() if N > 1 else N, xs[1], k if k <= 1 else 1 << (k - 1).bit_length(),
                        attrs["metric"])
    _check_rules(args, attrs)
    return None


def _check_rules(args: tuple[Any, ...], attrs: dict[str, Any]) -> None:
    queries, database = args
    for arg, t in (("queries", queries), ("database", database)):
        require_tensor(NAME, arg, t)
        if t.dim() != 2:
            raise InvalidInput(f"{NAME}: argument {arg!r}: expected a 2-D tensor [rows, D], got shape {tuple(t.shape)}")
    if queries.dtype not in DTYPES:
        raise InvalidInput(f"{NAME}: argument 'queries': expected dtype one of {[dtype_name(d) for d in DTYPES]}, "
                           f"got {dtype_name(queries.dtype)}")
    if database.dtype != queries.dtype:
        raise InvalidInput(f"{NAME}: argument 'database': expected dtype {dtype_name(queries.dtype)} (the dtype of "
                           f"queries), got {dtype_name(database.dtype)}")
    if database.device != queries.device:
        raise InvalidInput(f"{NAME}: argument 'database': expected device {queries.device} (the device of queries), "
                           f"got {database.device}")
    N, D = database.shape
    if D < 1:
        raise InvalidInput(f"{NAME}: argument 'database': expected D >= 1 columns, got shape {tuple(database.shape)}")
    if queries.shape[1] != D:
        raise InvalidInput(f"{NAME}: argument 'queries': expected D = {D} columns (those of database), "
                           f"got shape {tuple(queries.shape)}")
    if N < 1:
        raise InvalidInput(f"{NAME}: argument 'database': expected N >= 1 rows, got shape {tuple(database.shape)}")
    k = attrs["k"]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise InvalidInput(f"{NAME}: argument 'k': expected an int, got {k!r}")
    if not 1 <= k <= N:
        raise InvalidInput(f"{NAME}: argument 'k': expected 1 <= k <= N = {N} (the database's rows), got k={k}")
    attrs["k"] = int(k)
    if attrs["metric"] not in METRICS:
        raise InvalidInput(f"{NAME}: argument 'metric': expected one of {list(METRICS)}, got {attrs['metric']!r}")


def _verify_data(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> None:
    verify_finite(*args)


def verify_finite(queries: torch.Tensor, database: torch.Tensor) -> None:
    """NaN or inf anywhere: name the first bad row. When all is well, one sum per input and one host
    sync for both: a NaN or inf entry makes the sum NaN or inf, so a finite sum proves every entry
    finite (a plain sum runs 2.4x faster than aminmax); a sum that overflowed on finite data only
    sends the check to the row-by-row pass, which then finds nothing. On the CPU the two sums are read
    as numbers (no stack, isfinite and all: 16 -> 4.5 us at M=10 N=1000 D=16)."""
    if not (reads_data(queries) and reads_data(database)):
        return
    if queries.is_cpu:
        if math.isfinite(queries.detach().sum().item() + database.detach().sum().item()):
            return
    elif bool(torch.isfinite(torch.stack([queries.detach().sum(), database.detach().sum()])).all()):
        return
    raise_non_finite(queries, database)


def raise_non_finite(queries: torch.Tensor, database: torch.Tensor) -> None:
    """Raise ``InvalidInput`` naming the first row that holds NaN or inf, if any does (a kernel that
    checks the data in its own pass calls it when that pass saw one)."""
    for arg, t in (("queries", queries), ("database", database)):
        _first_non_finite(arg, t)


def _first_non_finite(arg: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        return
    bad = ~torch.isfinite(t.detach()).all(dim=1)
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0, 0])
    values = t[row].detach().cpu()
    col = int((~torch.isfinite(values)).nonzero()[0, 0])
    raise InvalidInput(f"{NAME}: argument {arg!r}: expected finite values, got {float(values[col])} in row {row} "
                       f"(column {col})")


def _key(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[Any, ...]:
    queries, database = args
    return (device_type(queries), dtype_name(queries.dtype), bucket(queries.shape[0]), bucket(database.shape[0]),
            database.shape[1], bucket(attrs["k"]), attrs["metric"])


def _device(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> str:
    return args[0].device.type


def _dtypes(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[torch.dtype, ...]:
    return (args[0].dtype,)


def _infer(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> Any:
    M, k = args[0].shape[0], attrs["k"]
    return KnnResult(TensorMeta(shape=(M, k), dtype=args[0].dtype), TensorMeta(shape=(M, k), dtype=torch.int64))


# -- samples -----------------------------------------------------------------------------------------

def make_inputs(gen: torch.Generator, device: str, dtype: torch.dtype, M: int, N: int, D: int, *,
                offset: Any = 0.0, scale: float = 1.0, hits: int = 0, duplicates: int = 0,
                grid: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random (queries, database): normal around ``offset`` (a scalar or a [D] tensor) with spread
    ``scale``, or integer points in [0, grid) when ``grid`` (which makes many exact ties). ``hits``
    queries are copies of database points; ``duplicates`` database points are copies of others."""
    def draw(rows: int) -> torch.Tensor:
        if grid:
            return torch.randint(0, grid, (rows, D), generator=gen).to(torch.float64)
        return torch.randn(rows, D, generator=gen, dtype=torch.float64) * scale + offset

    x, q = draw(N), draw(M)
    if duplicates and N > 1:
        src = torch.randint(0, N, (min(duplicates, N - 1),), generator=gen)
        dst = torch.randperm(N, generator=gen)[: src.numel()]
        x[dst] = x[src]
    if hits and M and N:
        rows = torch.randperm(M, generator=gen)[: min(hits, M)]
        q[rows] = x[torch.randint(0, N, (rows.numel(),), generator=gen)]
    return q.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)


def _location(database: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The database's per-dimension mean and overall spread: fresh samples sit where the caller's data
    does, since how far the data lies from the origin is what breaks the product expansion."""
    x = database.detach().to(torch.float64)
    mean = x.mean(dim=0)
    spread = float((x - mean).pow(2).mean().sqrt()) if x.shape[0] > 1 else 0.0
    return mean.cpu(), (spread if spread > 0 else 1.0)


def _resample(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator, M: int, N: int) -> Sample:
    queries, database = args
    offset, scale = _location(database)
    q, x = make_inputs(gen, queries.device.type, queries.dtype, M, N, database.shape[1], offset=offset, scale=scale,
                       hits=max(1, M // 8), duplicates=max(1, N // 64))
    # data near the dtype's range (a float32 database at +-3e38) spreads past it: keep the sample finite,
    # as the caller's data is (verify_data admits nothing else), or the reference cannot judge anything
    big = torch.finfo(q.dtype).max
    q, x = (t.nan_to_num(nan=0.0, posinf=big, neginf=-big) for t in (q, x))
    return Sample(args=(q, x), attrs=dict(attrs))


def _fits_reference(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> bool:
    """The numpy reference answers M * N * max(D, 8) = 2**24 in about 0.1 s."""
    queries, database = args
    return queries.shape[0] * database.shape[0] * max(database.shape[1], 8) <= REFERENCE_WORK


def _synthesize(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator) -> Sample:
    return _resample(args, attrs, gen, args[0].shape[0], args[1].shape[0])


def _pilot(sample: Sample, gen: torch.Generator) -> Sample | None:
    """A sixteenth of the queries against the whole database (a kd-tree is still built in full): queries
    are independent, so no kernel answers all of them faster than these."""
    queries, database = sample.args
    if queries.shape[0] < PILOT_MIN_QUERIES:
        return None
    return Sample(args=(queries[: queries.shape[0] // 16], database), attrs=dict(sample.attrs), name=sample.name)


def _shrink(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator) -> Sample:
    queries, database = args
    M, (N, D), k = queries.shape[0], database.shape, attrs["k"]
    n = min(N, max(SHRINK_N, k))
    m = min(M, max(4, min(48, SHRINK_WORK // (n * D))))
    return _resample(args, attrs, gen, m, n)


def _case(M: int, N: int, D: int, k: int, *, metric: str = "l2", dtype: torch.dtype = torch.float32,
          offset: float = 0.0, hits: int = 0, duplicates: int = 0, grid: int = 0, strided: bool = False) -> Any:
    def make(gen: torch.Generator, device: str) -> Sample:
        q, x = make_inputs(gen, device, dtype, M, N, D, offset=offset, hits=hits, duplicates=duplicates, grid=grid)
        if strided:  # the same values, laid out as a transposed view and a column slice
            q = q.t().contiguous().t()
            x = torch.stack([x, torch.zeros_like(x)], dim=2).reshape(N, 2 * D)[:, ::2]
        return Sample(args=(q, x), attrs={"k": k, "metric": metric})
    return make


CASES = {
    "d128-n8192-m256-k10": _case(256, 8192, 128, 10),
    "d3-n32768-m1024-k10": _case(1024, 32768, 3, 10),
    "d32-n10000-m200-k5-ip": _case(200, 10_000, 32, 5, metric="ip"),
}

EDGE_CASES = {
    "m0": _case(0, 50, 4, 3),
    "k-equals-n": _case(9, 17, 5, 17),
    "n1-k1": _case(5, 1, 3, 1),
    "d1-duplicates": _case(20, 200, 1, 5, duplicates=40, hits=4),
    "grid-ties": _case(40, 300, 3, 8, grid=3, hits=5),
    "grid-ties-ip": _case(40, 300, 4, 8, grid=3, metric="ip"),
    "offset-1000-d16": _case(30, 3000, 16, 5, offset=1000.0, hits=10),
    "offset-1000-d3": _case(30, 3000, 3, 5, offset=1000.0, hits=10),
    "ip-d24": _case(25, 2500, 24, 10, metric="ip"),
    "float64-d7": _case(17, 700, 7, 4, dtype=torch.float64, hits=3),
    "float64-d40-ip": _case(11, 1500, 40, 6, dtype=torch.float64, metric="ip"),
    "noncontiguous": _case(12, 400, 6, 3, strided=True, hits=2),
    "blocks-and-tiles": _case(300, 2600, 20, 7, hits=20),
    "one-query-many-tiles": _case(1, 5000, 32, 9, hits=1),
    "large-k": _case(6, 300, 10, 100, duplicates=10),
}


# -- compare rule ------------------------------------------------------------------------------------

def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def true_values(queries: torch.Tensor, database: torch.Tensor, indices: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 value, tolerance) of each (query, returned point) pair: the direct formula in float64,
    and how far the same formula in the inputs' dtype may be from it (the compare rule's tolerance)."""
    q = queries.detach().cpu().to(torch.float64)
    x = database.detach().cpu().to(torch.float64)
    idx = indices.detach().cpu()
    M, k = idx.shape
    D = q.shape[1]
    u = unit_roundoff(queries.dtype)
    floor = 2 * (D + 3) * u * float(torch.finfo(queries.dtype).smallest_normal)
    values = torch.empty(M, k, dtype=torch.float64)
    tol = torch.empty(M, k, dtype=torch.float64)
    rows = max(1, _ROW_ELEMENTS // max(1, k * D))
    for r0 in range(0, M, rows):
        qs = q[r0:r0 + rows, None, :]
        xs = x[idx[r0:r0 + rows]]
        if metric == "l2":
            values[r0:r0 + rows] = (qs - xs).pow(2).sum(-1)
            tol[r0:r0 + rows] = 2 * (D + 3) * u * values[r0:r0 + rows] + floor
        else:
            prod = qs * xs
            values[r0:r0 + rows] = prod.sum(-1)
            tol[r0:r0 + rows] = 2 * (D + 2) * u * prod.abs().sum(-1) + floor
    return values, tol


def _first(mask: torch.Tensor) -> tuple[int, int]:
    where = mask.nonzero()
    return int(where[0, 0]), int(where[0, 1])


def _compare(out: Any, ref: Any, sample: Sample) -> Verdict:
    queries, database = sample.args
    metric = sample.attrs["metric"]
    N = database.shape[0]
    dist, idx = (t.detach().cpu() for t in out)
    ref_idx = ref[1].detach().cpu()
    if idx.numel() == 0:
        return Verdict(ok=True)
    if bool(((idx < 0) | (idx >= N)).any()):
        r, c = _first((idx < 0) | (idx >= N))
        return Verdict(ok=False, max_error=float("inf"), reason=f"row {r}: index {int(idx[r, c])} is outside [0, {N})")
    ordered = idx.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        r, _ = _first(ordered[:, 1:] == ordered[:, :-1])
        return Verdict(ok=False, max_error=float("inf"), reason=f"row {r}: an index appears twice: {idx[r].tolist()}")
    sign = 1.0 if metric == "l2" else -1.0  # costs ascend in both metrics
    got, got_tol = true_values(queries, database, idx, metric)
    want, want_tol = true_values(queries, database, ref_idx, metric)
    # Beyond the dtype's range every value rounds to inf (or saturates): compare them all as its largest.
    big = float(torch.finfo(queries.dtype).max)
    got, want = got.clamp(-big, big), want.clamp(-big, big)
    err = (dist.to(torch.float64).clamp(-big, big) - got).abs()
    if bool((err > got_tol).any()):
        r, c = _first(err > got_tol)
        return Verdict(ok=False, max_error=float(err.max()), reason=(
            f"row {r}, rank {c}: distance {float(dist[r, c])!r} of index {int(idx[r, c])} is {float(err[r, c]):.3g} "
            f"from its float64 value {float(got[r, c])!r} (tolerance {float(got_tol[r, c]):.3g})"))
    cost = sign * dist.to(torch.float64)
    if bool((cost[:, 1:] < cost[:, :-1]).any()):
        r, c = _first(cost[:, 1:] < cost[:, :-1])
        return Verdict(ok=False, max_error=float(err.max()), reason=f"row {r}: distances are not in the metric's order "
                       f"at rank {c + 1}: {dist[r].tolist()}")
    tie = (cost[:, 1:] == cost[:, :-1]) & (idx[:, 1:] < idx[:, :-1])
    if bool(tie.any()):
        r, c = _first(tie)
        return Verdict(ok=False, max_error=float(err.max()), reason=f"row {r}: equal distances at ranks {c}, {c + 1} "
                       f"are not in index order: {idx[r, c:c + 2].tolist()}")
    got_cost, order = (sign * got).sort(dim=1)
    want_cost = sign * want  # the reference's own order is by these values
    slack = got_tol.gather(1, order) + want_tol
    miss = (got_cost - want_cost).abs()
    if bool((miss > slack).any()):
        r, c = _first(miss > slack)
        return Verdict(ok=False, max_error=float(miss.max()), reason=(
            f"row {r}, rank {c}: the returned points' true distances {(sign * got_cost[r]).tolist()} differ from the "
            f"reference's {(sign * want_cost[r]).tolist()} (a nearer neighbour was missed)"))
    problem = _group_problem(idx, ref_idx, want_cost, want_tol, N)
    if problem:
        return Verdict(ok=False, max_error=float(miss.max()), reason=problem)
    return Verdict(ok=True, max_error=max(float(err.max()), float(miss.max())))


def _group_problem(idx: torch.Tensor, ref_idx: torch.Tensor, want_cost: torch.Tensor, want_tol: torch.Tensor,
                   N: int) -> str:
    """Within each group of reference distances equal up to the tolerance (chained), the index sets must
    match; the last group of a row may be cut at k, so it is exempt."""
    gap = want_cost[:, 1:] - want_cost[:, :-1]
    boundary = gap > 2 * (want_tol[:, 1:] + want_tol[:, :-1])
    group = torch.cat([torch.zeros_like(boundary[:, :1], dtype=torch.int64), boundary.cumsum(dim=1)], dim=1)
    complete = group < group[:, -1:]
    # Sorting (group, index) keys puts each group's indices in order at that group's positions.
    got = (group * (N + 1) + idx).sort(dim=1).values
    want = (group * (N + 1) + ref_idx).sort(dim=1).values
    differ = complete & (got != want)
    if not bool(differ.any()):
        return ""
    r, c = _first(differ)
    members = (group[r] == group[r, c]).nonzero()[:, 0]
    return (f"row {r}: the points at ranks {members.tolist()} (equal distances up to the tolerance) are "
            f"{sorted(idx[r, members].tolist())}, the reference's are {sorted(ref_idx[r, members].tolist())}")


SPEC = OpSpec(
    name=NAME,
    summary="Exact k-nearest-neighbour search: squared L2 ascending or inner product descending, ties by index",
    inputs=("queries", "database"),
    attrs=(
        Attr(name="k", doc="neighbours per query, 1 <= k <= N"),
        Attr(name="metric", default="l2", doc="'l2' (squared Euclidean, ascending) or 'ip' (inner product, descending)"),
    ),
    verify=_verify,
    verify_data=_verify_data,
    key=_key,
    key_sizes=(2, 3, 5),
    device=_device,
    dtypes=_dtypes,
    infer=_infer,
    shrink=_shrink,
    synthesize=_synthesize,
    fits_reference=_fits_reference,
    pilot=_pilot,
    compare=_compare,
    cases=CASES,
    edge_cases=EDGE_CASES,
)
