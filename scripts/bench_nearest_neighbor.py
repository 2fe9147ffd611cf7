"""nearest_neighbor kernels side by side with their real peers, and what the autotuner picks by itself.

(a) D=128, N=100,000, M=1,000, k=10 against FAISS ``IndexFlatL2`` (search only: the index already
    holds the database, which flatters FAISS; ``add`` plus search is shown too);
(b) D=3, N=1,000,000, M=10,000, k=10 against scipy ``cKDTree`` (build plus query).

Each time is the best of ``--reps`` runs after one warm-up; ratios are ours / peer (below 1 is
faster). The autotuner's choice is a fresh lazy tuning of the call's dispatch key (an empty cache),
the way the first ``dispatcher.nearest_neighbor`` call on that key makes it.

    python scripts/bench_nearest_neighbor.py [--reps 3] [--cases a,b] [--threads N] [--no-tune] [--with-torch-b]
    python scripts/bench_nearest_neighbor.py --as-called [--threads N]

``--as-called``: ``dispatcher.nearest_neighbor`` on a warm key against the peers called directly, paired
and alternated in one process, on the default build and inside ``_build.forced_isa("avx2")``: FAISS
``IndexFlatL2`` search only (index built outside the timing) and add + search (the fair peer for a
one-shot call, which takes the raw database as the op does), and cKDTree build + query.

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


def _paired_ms(a: Callable[[], Any], b: Callable[[], Any], reps: int, budget_s: float = 3.0) -> tuple[float, float]:
    """Medians of a and b, alternated (order flipped each round) after two warm-up rounds."""
    import statistics

    for _ in range(2):
        a(), b()
    ta: list[float] = []
    tb: list[float] = []
    end = time.perf_counter() + budget_s
    for i in range(reps):
        for f, t in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
        if i >= 4 and time.perf_counter() > end:
            break
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def as_called() -> None:
    import faiss
    from scipy.spatial import cKDTree

    from core import dispatcher
    from plugins.fused import _build

    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    shapes = [(10, 1000, D, k) for D in (3, 16, 64, 128) for k in (1, 10)] + [(1000, 100_000, 128, 10),
                                                                               (10_000, 1_000_000, 3, 10)]
    table = []
    for M, N, D, k in shapes:
        q, x = make_inputs(gen, "cpu", torch.float32, M, N, D)
        qn, xn = q.numpy(), x.numpy()
        index = faiss.IndexFlatL2(D)
        index.add(xn)

        def add_search(D: int = D, xn: Any = xn, qn: Any = qn, k: int = k) -> Any:
            fresh = faiss.IndexFlatL2(D)
            fresh.add(xn)
            return fresh.search(qn, k)

        peers = {"faiss search": lambda: index.search(qn, k), "faiss add+search": add_search}
        if D <= 16:
            peers["cKDTree build+query"] = lambda: cKDTree(xn).query(qn, k, workers=threads)
        if N >= 1_000_000:
            peers = {"cKDTree build+query": peers["cKDTree build+query"]}
        ours = lambda q=q, x=x, k=k: dispatcher.nearest_neighbor(q, x, k=k)  # noqa: E731
        ours()  # tunes the key
        reps = 200 if N <= 10_000 else 5
        for isa in ("default", "avx2"):
            if isa != "default" and "avx2" not in _build.supported_isas():
                continue

            def call(ours: Callable[[], Any] = ours, isa: str = isa) -> Any:
                if isa == "default":
                    return ours()
                with _build.forced_isa(isa):
                    return ours()

            for name, peer in peers.items():
                o, p = _paired_ms(call, peer, reps)
                table.append([f"M={M} N={N} D={D} k={k}", isa, name, p, o, o / p, (o - p) * 1e3])
                print(tabulate([table[-1]], tablefmt="plain", floatfmt=".4g"), flush=True)
    print()
    print(tabulate(table, headers=["shape", "build", "peer", "peer ms", "dispatched ms", "ratio", "diff us"],
                   floatfmt=".4g"))
    print(f"{threads} threads, load average {os.getloadavg()[0]:.1f} at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cases", default="a,b")
    parser.add_argument("--threads", type=int, default=None, help="threads for ours and the peers alike")
    parser.add_argument("--no-tune", action="store_true", help="skip the autotuner's choice (it times every kernel)")
    parser.add_argument("--with-torch-b", action="store_true", help="also time the torch kernel in (b) (slow)")
    parser.add_argument("--as-called", action="store_true",
                        help="the dispatcher on a warm key against the peers called directly, paired")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
    except ImportError:
        pass
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.as_called:
        return as_called()
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
