"""Exact k-nearest-neighbour candidate selection in Triton, for CUDA (float32).

FAISS's GPU brute force (Johnson, Douze, Jegou, "Billion-scale similarity search with GPUs", 2017,
sec. 5) in the shape of Triton's matmul tutorial: one program takes a block of queries and one slice
of the database, streams database tiles through ``tl.dot``, and keeps a running top-``KP`` per query
in registers; ``KP`` candidates per (query, slice) are written out, never the [M, N] matrix. A pair
is one int64 key, the selection value's order-preserving bits above the database index, so keys are
unique and order by value, then index. A tile's keys enter the running set smallest first while they
beat its worst, which after the first tiles is rarely at all. (``tl.topk``'s bitonic network would
do the same in fixed time but runs for minutes in the interpreter the CPU tests use.)

The selection value is ``|x_c|^2 - 2 q_c.x_c`` on data centred at the database mean (or ``-q.x``
for ip), with ``input_precision="ieee"`` so the product is true float32 (TF32 would void the
margin). The launcher then re-ranks the candidates by the direct formula and certifies each row
with the torch backend's ``finish`` (plugins/torch_backend/nearest_neighbor.py): rows whose margin
cannot exclude every left-out point are recomputed exactly, so rounding never loses a neighbour.
A value that overflowed float32 (data beyond about 1e19) is selected as -inf, so it is re-ranked too.
Extra memory: [M, slices, KP] keys, slices <= 4 x SMs / query blocks; the re-rank's float64 gather.

``gpu_check(device)`` checks and times the kernel at full size on a real GPU for ``scripts/gpu_check.py``.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch
import triton
import triton.language as tl

from core.ops.nearest_neighbor import KnnResult
from plugins.torch_backend.nearest_neighbor import candidates_per_query, finish, margin, norms

MAX_K = 64  # the running set is [BLOCK_M, KP] int64 in registers, KP = next pow2 >= k + max(k, 16) <= 128
_MAX_KEY = tl.constexpr(2**63 - 1)  # a global a @triton.jit function reads must be a constexpr
_UNIT = 2.0 ** -24  # float32, products in "ieee" precision


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def _select_kernel(Q, X, MEAN, OUT, M, N, D, stride_qm, stride_xn, stride_om, NUM_SPLITS,
                   IP: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = rows < M
    tiles = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(tiles, NUM_SPLITS)
    best = tl.full([BLOCK_M, KP], _MAX_KEY, tl.int64)
    for t in range(split * per_split, tl.minimum((split + 1) * per_split, tiles)):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = cols < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        xn = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            in_d = dims < D
            mu = tl.load(MEAN + dims, mask=in_d, other=0.0)
            q = tl.load(Q + rows[:, None] * stride_qm + dims[None, :], mask=in_m[:, None] & in_d[None, :], other=0.0)
            x = tl.load(X + cols[:, None] * stride_xn + dims[None, :], mask=in_n[:, None] & in_d[None, :], other=0.0)
            q = tl.where(in_d[None, :], q - mu[None, :], 0.0)
            x = tl.where(in_d[None, :], x - mu[None, :], 0.0)
            acc = tl.dot(q, tl.trans(x), acc, input_precision="ieee")
            xn += tl.sum(x * x, axis=1)
        if IP:
            value = -acc
        else:
            value = xn[None, :] - 2.0 * acc
        # An overflowed value (inf, or inf - inf = NaN, whose sign bit varies by device) bounds nothing:
        # as -inf it is kept first and re-ranked, and a row keeping only such values is never certified.
        value = tl.where(value < float("inf"), value, -float("inf"))
        # Signed-int order of these bits is the float order; the index below breaks ties.
        bits = value.to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = (bits.to(tl.int64) << 32) | cols[None, :].to(tl.int64)
        key = tl.where(in_n[None, :], key, _MAX_KEY)
        # Insert the tile's smallest key into each row's running set while it beats the row's worst;
        # after the first tiles this loop rarely runs (keys are unique: the index is part of them).
        low = tl.min(key, axis=1)
        worst = tl.max(best, axis=1)
        while tl.max((low < worst).to(tl.int32), axis=0) > 0:
            slot = tl.argmax(best, axis=1)
            take = (low < worst)[:, None] & (tl.arange(0, KP)[None, :] == slot[:, None])
            best = tl.where(take, low[:, None], best)
            key = tl.where(key == low[:, None], _MAX_KEY, key)
            low = tl.min(key, axis=1)
            worst = tl.max(best, axis=1)
    out = OUT + rows[:, None] * stride_om + split * KP + tl.arange(0, KP)[None, :]
    tl.store(out, best, mask=in_m[:, None])


# Every config fits an H100/H200's shared memory (at most ~150 KB at 3 stages); see the compile test.
CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
           for bm in (32, 64) for bn, bd in ((128, 32), (128, 64), (256, 32)) for w, s in ((4, 2), (8, 3))]


def _configs() -> list[Any]:
    if _interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
    return CONFIGS


_select = triton.autotune(configs=_configs(), key=["D", "KP", "IP"])(_select_kernel)


def _unpack(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 selection values, int64 indices) from the kernel's keys."""
    bits = (keys >> 32).to(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def _splits(M: int, N: int, device: torch.device, block_m: int, block_n: int) -> int:
    """Database slices per query block: enough programs to fill the GPU (a few per SM)."""
    if device.type == "cuda":
        programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        programs = 2
    return max(1, min(triton.cdiv(N, block_n), triton.cdiv(programs, triton.cdiv(M, block_m))))


def select_candidates(q: torch.Tensor, x: torch.Tensor, k: int, metric: str,
                      config: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidate indices [M, c], largest kept selection value per row, margin per row), the same
    contract as the torch backend's ``select_candidates``; ``config`` fixes the block sizes (tests)."""
    M, D = q.shape
    N = x.shape[0]
    c = candidates_per_query(k, N)
    KP = triton.next_power_of_2(k + max(k, 16))
    q, x = q.contiguous(), x.contiguous()
    mean = x.mean(dim=0, dtype=torch.float64).to(torch.float32) if metric == "l2" else x.new_zeros(D)
    # The largest ``split`` any config may use: slices are sized for the smallest blocks.
    smallest = config or {"BLOCK_M": 32, "BLOCK_N": 128}
    S = _splits(M, N, q.device, smallest["BLOCK_M"], smallest["BLOCK_N"])
    keys = torch.empty(M, S * KP, dtype=torch.int64, device=q.device)
    args = (q, x, mean, keys, M, N, D, q.stride(0), x.stride(0), keys.stride(0), S)
    if config is None:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), S)  # noqa: E731
        _select[grid](*args, IP=metric == "ip", KP=KP)
    else:
        _select_kernel[(triton.cdiv(M, config["BLOCK_M"]), S)](*args, IP=metric == "ip", KP=KP, **config)
    best = torch.topk(keys, c, dim=1, largest=False).values
    value, cand = _unpack(best)
    qc = q - mean
    qn = qc.to(torch.float64).pow(2).sum(dim=1) if metric == "l2" else 0.0
    worst = value.max(dim=1).values.to(torch.float64) + qn
    xmax = 0.0
    for j0 in range(0, N, 1 << 16):
        xmax = max(xmax, float(norms(x[j0:j0 + (1 << 16)] - mean, _UNIT).max()))
    return cand, worst, margin(metric, D, _UNIT, norms(qc, _UNIT), xmax)


def nearest_neighbor(queries: torch.Tensor, database: torch.Tensor, *, k: int, metric: str,
                     config: dict[str, int] | None = None) -> KnnResult:
    """Triton candidate selection, then the exact re-rank and per-row certification."""
    if queries.shape[0] == 0:
        return KnnResult(queries.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=queries.device))
    queries, database = queries.detach(), database.detach()  # not differentiable: plain tensors out
    cand, worst, margin_ = select_candidates(queries, database, k, metric, config)
    return finish(queries, database, cand, worst, margin_, k, metric)


def gpu_check(device: str) -> list[dict]:
    """The kernel at full size on a real GPU: timed beside the torch kernel (float32), and judged by the
    op's compare rule on its first 512 queries against the torch kernel in float64 (exact, certified).
    The first call of each shape also runs triton.autotune; the time is of the second."""
    from core.ops.nearest_neighbor import SPEC, make_inputs
    from core.spec import Sample
    from plugins.torch_backend.nearest_neighbor import nearest_neighbor as torch_knn

    gen = torch.Generator().manual_seed(0)
    cases = {
        "a-d128-n100000-m1000-k10": (1000, 100_000, 128, 10, "l2", 0.0),
        "b-d3-n1000000-m10000-k10": (10_000, 1_000_000, 3, 10, "l2", 0.0),
        "offset1000-d64-n200000-m2000-k16": (2_000, 200_000, 64, 16, "l2", 1000.0),
        "ip-d96-n200000-m1000-k32": (1_000, 200_000, 96, 32, "ip", 0.0),
    }

    def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
        fn(*args, **kw)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        torch.cuda.synchronize(device)
        return out, (time.perf_counter() - t0) * 1e3

    rows = []
    for name, (M, N, D, k, metric, offset) in cases.items():
        try:
            q, x = make_inputs(gen, device, torch.float32, M, N, D, offset=offset, hits=M // 10, duplicates=N // 100)
            out, ms = timed(nearest_neighbor, q, x, k=k, metric=metric)
            _, torch_ms = timed(torch_knn, q, x, k=k, metric=metric)
            part = q[:512]
            ref = torch_knn(part.double(), x.double(), k=k, metric=metric)
            verdict = SPEC.compare(KnnResult(out.distances[:512], out.indices[:512]), ref,
                                   Sample(args=(part, x), attrs={"k": k, "metric": metric}))
            rows.append({"kernel": "fused (triton)", "case": name, "ok": verdict.ok, "max_error": verdict.max_error,
                         "ms": ms, "note": verdict.reason or f"torch kernel {torch_ms:.1f} ms"})
        except Exception as e:  # report, do not abort the other cases
            rows.append({"kernel": "fused (triton)", "case": name, "ok": False, "max_error": float("inf"),
                         "ms": float("nan"), "note": f"{type(e).__name__}: {e}"[:300]})
    return rows
