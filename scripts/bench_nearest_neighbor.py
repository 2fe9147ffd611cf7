"""nearest_neighbor kernels side by side with their real peers, and what the autotuner picks by itself.

(a) D=128, N=100,000, M=1,000, k=10 against FAISS ``IndexFlatL2`` (search only: the index already
    holds the database, which flatters FAISS; ``add`` plus search is shown too);
(b) D=3, N=1,000,000, M=10,000, k=10 against scipy ``cKDTree`` (build plus query).

Each time is the best of ``--reps`` runs after one warm-up; ratios are ours / peer (below 1 is
faster). The autotuner's choice is a fresh lazy tuning of the call's dispatch key (an empty cache),
the way the first ``dispatcher.nearest_neighbor`` call on that key makes it.

    python scripts/bench_nearest_neighbor.py [--reps 3] [--cases a,b] [--threads N] [--no-tune] [--with-torch-b]

``--threads`` sets torch's, FAISS's and cKDTree's thread counts alike (default: torch's).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SWITCHYARD_CACHE_DIR", tempfile.mkdtemp(prefix="switchyard-bench-nn-"))
os.environ.setdefault("SWITCHYARD_NO_CACHE", "1")  # tune afresh: the choice shown is made now

from core.ops.nearest_neighbor import SPEC, KnnResult, make_inputs, true_values  # noqa: E402
from core.spec import Sample  # noqa: E402
from plugins.fused.nearest_neighbor import nearest_neighbor as fused, nearest_neighbor_kdtree as fused_kdtree  # noqa: E402
from plugins.torch_backend.nearest_neighbor import nearest_neighbor as torch_knn  # noqa: E402


def _best_s(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    out = fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _agrees(out: KnnResult, q: torch.Tensor, x: torch.Tensor, peer_idx: torch.Tensor, k: int) -> str:
    """The op's compare rule, with the peer's answer (ordered by true distance) as the reference."""
    values, order = true_values(q, x, peer_idx, "l2")[0].sort(dim=1)
    ref = KnnResult(values.to(q.dtype), peer_idx.gather(1, order))
    verdict = SPEC.compare(out, ref, Sample(args=(q, x), attrs={"k": k, "metric": "l2"}))
    return "yes" if verdict.ok else f"NO: {verdict.reason[:60]}"


def _autotuned(q: torch.Tensor, x: torch.Tensor, k: int) -> tuple[str, float, str]:
    from core import dispatcher

    t0 = time.perf_counter()
    explanation = dispatcher.explain("nearest_neighbor", q, x, k=k)
    tune_s = time.perf_counter() - t0
    times = ", ".join(f"{r.backend} {r.median_ms:.0f} ms" for r in explanation.rows if r.median_ms is not None)
    return explanation.chosen or "none", tune_s, times


def case_a(reps: int, tune: bool) -> tuple[list[list[Any]], list[Any]]:
    import faiss

    M, N, D, k = 1000, 100_000, 128, 10
    q, x = make_inputs(torch.Generator().manual_seed(0), "cpu", torch.float32, M, N, D)
    qn, xn = q.numpy(), x.numpy()
    index = faiss.IndexFlatL2(D)
    index.add(xn)
    peer_s, (_, peer_idx) = _best_s(lambda: index.search(qn, k), reps)

    def add_and_search() -> Any:
        fresh = faiss.IndexFlatL2(D)
        fresh.add(xn)
        return fresh.search(qn, k)

    peer_add_s, _ = _best_s(add_and_search, reps)
    peer_idx = torch.from_numpy(peer_idx)
    rows = [["(a) D=128 N=1e5 M=1e3", "FAISS IndexFlatL2 search", peer_s * 1e3, 1.0, ""],
            ["", "FAISS add + search", peer_add_s * 1e3, peer_add_s / peer_s, ""]]
    cdist_s, _ = _best_s(lambda: torch.cdist(q, x).topk(k, largest=False), reps)
    rows.append(["", "torch.cdist + topk", cdist_s * 1e3, cdist_s / peer_s, ""])
    for name, fn in (("fused", fused), ("torch", torch_knn)):
        s, out = _best_s(lambda fn=fn: fn(q, x, k=k, metric="l2"), reps)
        rows.append(["", f"ours: {name}", s * 1e3, s / peer_s, _agrees(out, q, x, peer_idx, k)])
    return rows, ["(a)", *_autotuned(q, x, k)] if tune else []


def case_b(reps: int, tune: bool, with_torch: bool) -> tuple[list[list[Any]], list[Any]]:
    from scipy.spatial import cKDTree

    M, N, D, k = 10_000, 1_000_000, 3, 10
    q, x = make_inputs(torch.Generator().manual_seed(1), "cpu", torch.float32, M, N, D)
    qn, xn = q.numpy(), x.numpy()
    workers = torch.get_num_threads()
    peer_s, (_, peer_idx) = _best_s(lambda: cKDTree(xn).query(qn, k, workers=workers), reps)
    tree = cKDTree(xn)
    query_s, _ = _best_s(lambda: tree.query(qn, k, workers=workers), reps)
    peer_idx = torch.from_numpy(peer_idx)
    rows = [["(b) D=3 N=1e6 M=1e4", "cKDTree build + query", peer_s * 1e3, 1.0, ""],
            ["", "cKDTree query only", query_s * 1e3, query_s / peer_s, ""]]
    kernels = [("fused-kdtree", fused_kdtree, reps), ("fused", fused, 1)]
    if with_torch:
        kernels.append(("torch", torch_knn, 1))
    for name, fn, n in kernels:
        s, out = _best_s(lambda fn=fn: fn(q, x, k=k, metric="l2"), n)
        rows.append(["", f"ours: {name}", s * 1e3, s / peer_s, _agrees(out, q, x, peer_idx, k)])
    return rows, ["(b)", *_autotuned(q, x, k)] if tune else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cases", default="a,b")
    parser.add_argument("--threads", type=int, default=None, help="threads for ours and the peers alike")
    parser.add_argument("--no-tune", action="store_true", help="skip the autotuner's choice (it times every kernel)")
    parser.add_argument("--with-torch-b", action="store_true", help="also time the torch kernel in (b) (slow)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
    except ImportError:
        pass
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    table, chosen = [], []
    for name in args.cases.split(","):
        tune = not args.no_tune
        rows, pick = case_a(args.reps, tune) if name == "a" else case_b(args.reps, tune, args.with_torch_b)
        table += rows
        if pick:
            chosen.append(pick)
    print(tabulate(table, headers=["case", "kernel", "best ms", "vs peer", "agrees with peer"], floatfmt=".3g"))
    if chosen:
        print()
        print(tabulate(chosen, headers=["case", "autotuner chose", "tuning s", "timed candidates"],
                       floatfmt=".3g"))


if __name__ == "__main__":
    main()
