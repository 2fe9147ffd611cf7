"""Peer parity: each op as a user calls it (``dispatcher.<op>``, warm key) against the peer called directly.

Each row warms the dispatch key first (the first call tunes it), then times ours and the peer paired and
alternated in one process (peer, ours, ours, peer, ...), several calls per sample for microsecond rows;
the ratio is the median of the per-pair ratios. Target per row: at most 1.10x the peer's time, or at
most 5 us more. Rows print as they finish; the table, sorted worst row last, at the end.

    python scripts/bench_peer_parity.py [--ops attention,precision_cast,nearest_neighbor,split_finding,decode_step]
                                        [--quick] [--heldout] [--json PATH] [--budget SECONDS] [--match S1,S2]
    python scripts/bench_peer_parity.py --random N [--seed S] [--ops ...]   # N rows per op of random shapes
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core import dispatcher  # noqa: E402

Row = tuple[str, Callable[[], Any], Callable[[], Any], str]  # (name, ours, peer, peer description)
RATIO, SLACK_US = 1.10, 5.0


def paired(ours: Callable[[], Any], peer: Callable[[], Any], budget: float) -> tuple[float, float, float]:
    """(our median us, peer median us, median of per-pair ratios), alternating the order every pair."""
    peer(), ours()
    t0 = time.perf_counter()
    peer()
    one = time.perf_counter() - t0
    n = max(1, int(2e-3 / max(one, 1e-7)))  # calls per sample: a sample of about 2 ms at least
    ts: dict[str, list[float]] = {"o": [], "p": []}
    ratios = []
    end = time.perf_counter() + budget
    i = 0
    while i < 6 or (time.perf_counter() < end and i < 400):
        order = (("p", peer), ("o", ours)) if i % 2 == 0 else (("o", ours), ("p", peer))
        got = {}
        for tag, fn in order:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            got[tag] = (time.perf_counter() - t0) / n * 1e6
            ts[tag].append(got[tag])
        ratios.append(got["o"] / got["p"])
        i += 1
    return statistics.median(ts["o"]), statistics.median(ts["p"]), statistics.median(ratios)


# -- rows ---------------------------------------------------------------------------------------------

def attention_rows(quick: bool) -> Iterator[Row]:
    gen = torch.Generator().manual_seed(0)
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    if quick:
        decode = [(1, 32, 8, 1, 1024, 128), (8, 16, 16, 1, 256, 64), (4, 32, 4, 8, 4096, 128)]
        prefill = [(2, 8, 2, 512, 64, True), (1, 8, 8, 64, 64, False), (1, 2, 2, 40, 16, True)]
    else:
        decode = [(B, Hq, Hkv, Lq, Lk, D) for B in (1, 4, 16) for Hq, Hkv in ((16, 16), (32, 8), (32, 4))
                  for Lq in (1, 4, 8) for Lk in (128, 1024, 8192) for D in (64, 128)
                  if B * Hkv * Lk * D * 2 * 4 <= 1 << 29 and (Lq != 4 or B == 4)]
        prefill = [(B, 8, Hkv, L, 64, c) for B in (1, 2) for Hkv in (8, 2) for L in (16, 64, 128, 512) for c in (False, True)]
        prefill += [(1, 2, Hkv, L, 16, c) for Hkv in (2, 1) for L in (24, 40) for c in (False, True)]  # short, narrow
    for dt in dtypes:
        name = str(dt).removeprefix("torch.")
        for causal in (False, True):
            q, k, v = (torch.randn(1, 1, 4, 8, generator=gen).to(dt) for _ in range(3))
            yield (f"attention tiny [1,1,4,8] causal={causal} {name}",
                   lambda q=q, k=k, v=v, c=causal: dispatcher.attention(q, k, v, causal=c),
                   lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c), "SDPA")
        for B, Hq, Hkv, Lq, Lk, D in decode:
            q = torch.randn(B, Hq, Lq, D, generator=gen).to(dt)
            k, v = (torch.randn(B, Hkv, Lk, D, generator=gen).to(dt) for _ in range(2))
            mask = None if Lq == 1 else torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)  # bottom-right
            yield (f"attention decode B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} causal {name}",
                   lambda q=q, k=k, v=v: dispatcher.attention(q, k, v, causal=True),
                   lambda q=q, k=k, v=v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                   "SDPA (enable_gqa, bottom-right mask)")
        for B, Hq, Hkv, L, D, causal in prefill:
            q = torch.randn(B, Hq, L, D, generator=gen).to(dt)
            k, v = (torch.randn(B, Hkv, L, D, generator=gen).to(dt) for _ in range(2))
            yield (f"attention prefill B={B} Hq={Hq} Hkv={Hkv} L={L} D={D} causal={causal} {name}",
                   lambda q=q, k=k, v=v, c=causal: dispatcher.attention(q, k, v, causal=c),
                   lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c, enable_gqa=True),
                   "SDPA (enable_gqa)")


def precision_cast_rows(quick: bool) -> Iterator[Row]:
    gen = torch.Generator().manual_seed(1)
    targets = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
    for e in ((10, 18, 22) if quick else (10, 14, 18, 22, 24, 26)):
        x = torch.randn(1 << e, generator=gen)
        for dt in targets:
            name = str(dt).removeprefix("torch.")
            fmax = float(torch.finfo(dt).max)
            yield (f"precision_cast 2^{e} -> {name} none", lambda x=x, dt=dt: dispatcher.precision_cast(x, dtype=dt),
                   lambda x=x, dt=dt: x.to(dt), "x.to(dtype)")
            yield (f"precision_cast 2^{e} -> {name} amax",
                   lambda x=x, dt=dt: dispatcher.precision_cast(x, dtype=dt, scaling="amax"),
                   lambda x=x, dt=dt, m=fmax: (x * (m / x.abs().amax())).to(dt), "(x * max/amax).to(dtype)")


def knn_peer(q: torch.Tensor, x: torch.Tensor, k: int, metric: str = "l2") -> tuple[Callable[[], Any], str]:
    """A k-NN row's peer and its description: cKDTree (build + query) for l2 at D <= 3, else FAISS's exact
    flat index (add + search)."""
    import faiss
    from scipy.spatial import cKDTree

    qn, xn = q.numpy(), x.numpy()
    D = xn.shape[1]
    if D <= 3 and metric == "l2":
        return (lambda: cKDTree(xn).query(qn, k, workers=torch.get_num_threads())), "cKDTree build + query"
    flat = faiss.IndexFlatL2 if metric == "l2" else faiss.IndexFlatIP

    def peer() -> Any:
        index = flat(D)
        index.add(xn)
        return index.search(qn, k)
    return peer, f"FAISS IndexFlat{'L2' if metric == 'l2' else 'IP'} add + search"


def nearest_neighbor_rows(quick: bool) -> Iterator[Row]:
    gen = torch.Generator().manual_seed(2)
    sizes = [(10, 1000, 16), (10, 1000, 3)] + ([] if quick else [(1000, 100_000, 128), (10_000, 1_000_000, 3)])
    for M, N, D in sizes:
        q, x = torch.randn(M, D, generator=gen), torch.randn(N, D, generator=gen)
        peer, what = knn_peer(q, x, 10)
        yield (f"nearest_neighbor M={M} N={N} D={D} k=10", lambda q=q, x=x: dispatcher.nearest_neighbor(q, x, k=10),
               peer, what)


def split_finding_rows(quick: bool) -> Iterator[Row]:
    import numpy as np
    import xgboost as xgb

    from core.ops.split_finding import make_inputs

    gen = torch.Generator().manual_seed(3)
    for n in ((10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)):
        bins, grad, hess, nodes = make_inputs(gen, "cpu", n=n, f=28, num_nodes=1, inactive=0.0)
        xb = bins.numpy().astype(np.float32)
        xb[xb == 255] = np.nan
        dtrain = xgb.QuantileDMatrix(xb, label=np.zeros(n, dtype=np.float32), max_bin=256, missing=np.nan)
        g, h = grad.numpy(), hess.numpy()
        params = {"tree_method": "hist", "max_depth": 1, "eta": 1.0, "base_score": 0.0, "max_bin": 256,
                  "nthread": torch.get_num_threads()}
        yield (f"split_finding n={n} f=28 one node",
               lambda a=(bins, grad, hess, nodes): dispatcher.split_finding(*a, num_nodes=1),
               lambda d=dtrain, g=g, h=h, p=params: xgb.train(p, d, num_boost_round=1, obj=lambda pr, dd: (g, h)),
               "XGBoost hist depth-1 round")


def decode_step_rows(quick: bool) -> Iterator[Row]:
    from bench_decode_step import naive

    from core.ops.decode_step import SPEC, chain, make_inputs, medusa_tree

    gen = torch.Generator().manual_seed(4)
    for V in ((32000,) if quick else (32000, 151936)):
        for tree, parents in (("medusa-64", medusa_tree(64)), ("chain-5", chain(5))):
            for B in ((1,) if quick else (1, 8)):
                for rule in (("greedy", "typical") + (("rejection",) if tree == "chain-5" else ())):
                    s = make_inputs(gen, "cpu", B=B, parents=parents, V=V, rule=rule,
                                    temperature=0.7 if rule == "typical" else 1.0)
                    args, attrs = SPEC.prepare(s.args, s.attrs)
                    yield (f"decode_step {rule} {tree} B={B} V={V}",
                           lambda s=s: dispatcher.decode_step(*s.args, **s.attrs),
                           lambda a=args, kw=attrs: naive(*a, **kw), "naive softmax step")


def heldout_rows(quick: bool) -> Iterator[Row]:
    """Shapes and layouts the sweep above does not have (``--heldout``): odd head dims and query counts,
    transposed and 16-bit or float64 cast sources, the inner-product metric, other k. Identity casts
    (float16 to float16) are left out: ``x.to`` returns ``x`` itself there, while precision_cast still
    reads every element for its amax and non-finite count."""
    gen = torch.Generator().manual_seed(5)
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt).removeprefix("torch.")
        for B, Hq, Hkv, Lq, Lk, D, causal in ((2, 12, 4, 1, 300, 96, True), (1, 8, 1, 2, 2000, 64, True),
                                               (3, 16, 2, 5, 700, 128, True), (1, 12, 12, 200, 200, 64, True),
                                               (2, 8, 8, 333, 333, 80, False), (2, 4, 4, 3, 3, 16, False),
                                               (1, 32, 8, 16, 512, 128, True), (4, 4, 4, 96, 96, 32, False),
                                               (1, 8, 8, 256, 256, 24, True), (1, 12, 12, 300, 300, 72, False)):
            q = torch.randn(B, Hq, Lq, D, generator=gen).to(dt)
            k, v = (torch.randn(B, Hkv, Lk, D, generator=gen).to(dt) for _ in range(2))
            # one query attends every key (bottom-right causal): no mask, as a user would call SDPA
            mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq) if causal and Lq not in (1, Lk) else None
            yield (f"attention B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} causal={causal} {name}",
                   lambda q=q, k=k, v=v, c=causal: dispatcher.attention(q, k, v, causal=c),
                   lambda q=q, k=k, v=v, m=mask, c=causal and Lq == Lk: F.scaled_dot_product_attention(
                       q, k, v, attn_mask=m, is_causal=c, enable_gqa=True), "SDPA (enable_gqa)")
    for what, x in (("[1024,1024].t() float32", torch.randn(1024, 1024, generator=gen).t()),
                    ("2^20+7 float32", torch.randn((1 << 20) + 7, generator=gen)),
                    ("2^20 bfloat16", torch.randn(1 << 20, generator=gen).bfloat16()),
                    ("2^20 float16", torch.randn(1 << 20, generator=gen).half()),
                    ("2^16 float64", torch.randn(1 << 16, generator=gen, dtype=torch.float64))):
        for dt in (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            if dt == x.dtype:
                continue
            fmax = float(torch.finfo(dt).max)
            name = str(dt).removeprefix("torch.")
            yield (f"precision_cast {what} -> {name} none", lambda x=x, dt=dt: dispatcher.precision_cast(x, dtype=dt),
                   lambda x=x, dt=dt: x.to(dt), "x.to(dtype)")
            if not quick:
                yield (f"precision_cast {what} -> {name} amax",
                       lambda x=x, dt=dt: dispatcher.precision_cast(x, dtype=dt, scaling="amax"),
                       lambda x=x, dt=dt, m=fmax: (x.float() * (m / x.abs().amax().float())).to(dt),
                       "(x.float() * max/amax).to(dtype)")  # in float32: max/amax overflows float16
    for M, N, D, k, metric in ((1, 5000, 64, 10, "l2"), (5, 2000, 8, 10, "l2"), (10, 1000, 16, 1, "l2"),
                               (10, 1000, 16, 50, "l2"), (10, 1000, 16, 10, "ip"), (32, 4000, 24, 5, "l2"),
                               (200, 20000, 64, 10, "ip"), (3, 100_000, 128, 10, "l2"), (10, 1000, 16, 20, "l2"),
                               (10, 1000, 4, 50, "l2"), (5, 2000, 8, 32, "l2"), (10, 1000, 24, 100, "l2"),
                               (10, 5000, 16, 64, "l2"), (1, 128476, 8, 16, "ip"), (1, 50000, 3, 10, "ip"),
                               (1, 69832, 8, 1, "l2"), (1, 20000, 5, 4, "ip")):
        q, x = torch.randn(M, D, generator=gen), torch.randn(N, D, generator=gen)
        peer, what = knn_peer(q, x, k, metric)
        yield (f"nearest_neighbor M={M} N={N} D={D} k={k} {metric}",
               lambda q=q, x=x, k=k, m=metric: dispatcher.nearest_neighbor(q, x, k=k, metric=m), peer, what)


def random_rows(count: int, seed: int, ops: set[str]) -> Iterator[Row]:
    """``count`` rows per op in ``ops`` of seeded random shapes (``--random N --seed S``), drawn afresh rather
    than chosen: attention of any GQA group, head dim, query and key length, causal or not, in float32,
    bfloat16 or float16; casts of any length, contiguous or strided, from float32, float16, bfloat16 or
    float64; k-NN of any M, N, D and k, both metrics. A speed the fixed sweep reaches only on its own
    shapes shows here."""
    import random

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n = 0
    while "attention" in ops and n < count:
        dt = rng.choice((torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float16))
        Hkv = rng.choice((1, 2, 4, 8, 16))
        Hq = Hkv * rng.choice((1, 1, 2, 4, 8))
        D = rng.choice((16, 32, 48, 64, 64, 72, 80, 96, 112, 128, 128, 256))
        B = rng.choice((1, 1, 2, 3, 4, 8, 16))
        causal = rng.random() < 0.6
        if rng.random() < 0.5:  # decode: a few queries against a long cache
            Lq, Lk = rng.choice((1, 1, 1, 2, 3, 4, 5, 8)), rng.randint(16, 8192)
        else:
            Lq = rng.randint(2, 1024)
            Lk = Lq if rng.random() < 0.7 else rng.randint(Lq, 2 * Lq)
        if B * Hkv * Lk * D > 1 << 25 or B * Hq * Lq * Lk * D > 1 << 33 or Hq > 64:
            continue
        n += 1
        q = torch.randn(B, Hq, Lq, D, generator=gen).to(dt)
        k, v = (torch.randn(B, Hkv, Lk, D, generator=gen).to(dt) for _ in range(2))
        mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq) if causal and Lq not in (1, Lk) else None
        name = str(dt).removeprefix("torch.")
        yield (f"attention B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} causal={causal} {name}",
               lambda q=q, k=k, v=v, c=causal: dispatcher.attention(q, k, v, causal=c),
               lambda q=q, k=k, v=v, m=mask, c=causal and Lq == Lk > 1: F.scaled_dot_product_attention(
                   q, k, v, attn_mask=m, is_causal=c, enable_gqa=True), "SDPA (enable_gqa)")
    targets = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
    for _ in range(count if "precision_cast" in ops else 0):
        src = rng.choice((torch.float32, torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64))
        dt = rng.choice([t for t in targets if t != src])
        numel = rng.randint(1 << 8, 1 << rng.randint(9, 25))
        if rng.random() < 0.25:  # a transposed 2-D view
            cols = rng.choice((64, 256, 1000, 4096))
            x = torch.randn(max(1, numel // cols), cols, generator=gen).to(src).t()
            what = f"[{x.shape[0]},{x.shape[1]}] (transposed)"
        else:
            x = torch.randn(numel, generator=gen).to(src)
            what = str(numel)
        fmax = float(torch.finfo(dt).max)
        label = f"{what} {str(src).removeprefix('torch.')} -> {str(dt).removeprefix('torch.')}"
        if rng.random() < 0.5:
            yield (f"precision_cast {label} none", lambda x=x, dt=dt: dispatcher.precision_cast(x, dtype=dt),
                   lambda x=x, dt=dt: x.to(dt), "x.to(dtype)")
        else:
            yield (f"precision_cast {label} amax", lambda x=x, dt=dt: dispatcher.precision_cast(x, dtype=dt, scaling="amax"),
                   lambda x=x, dt=dt, m=fmax: (x.float() * (m / x.abs().amax().float())).to(dt),
                   "(x.float() * max/amax).to(dtype)")
    for _ in range(count if "nearest_neighbor" in ops else 0):
        D = rng.choice((2, 3, 8, 16, 24, 32, 64, 100, 128, 256))
        N = rng.randint(500, 300_000 if D <= 32 else 100_000)
        M = rng.choice((1, 2, 5, 10, 32, 100, 500))
        k = min(N, rng.choice((1, 5, 10, 10, 16, 32, 64, 100)))
        metric = "l2" if D <= 3 else rng.choice(("l2", "l2", "ip"))
        q, x = torch.randn(M, D, generator=gen), torch.randn(N, D, generator=gen)
        peer, what = knn_peer(q, x, k, metric)
        yield (f"nearest_neighbor M={M} N={N} D={D} k={k} {metric}",
               lambda q=q, x=x, k=k, m=metric: dispatcher.nearest_neighbor(q, x, k=k, metric=m), peer, what)


OPS = {"attention": attention_rows, "precision_cast": precision_cast_rows, "nearest_neighbor": nearest_neighbor_rows,
       "split_finding": split_finding_rows, "decode_step": decode_step_rows}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown CPU"


def _decision(key: tuple[str, tuple[object, ...]]) -> dict[str, object] | None:
    """How the tuner decided a new key (for the JSON: why a row's kernel won, and each candidate's median
    and reason), so that a mis-pick in a long sweep can be read afterwards without reproducing it."""
    decision = dispatcher._state.tuner.decisions.get(key)
    if decision is None:  # served from the tuning cache file
        return None
    return {"why": decision.why, "rows": [{"backend": row.backend, "status": row.status, "median_ms": row.median_ms,
                                          "reason": row.reason} for row in decision.rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--quick", action="store_true", help="a subset of rows (about 1-2 minutes)")
    p.add_argument("--heldout", action="store_true", help="other shapes, layouts and source dtypes instead")
    p.add_argument("--random", type=int, default=0, metavar="N",
                   help="N rows per op of seeded random shapes instead (attention, precision_cast, nearest_neighbor)")
    p.add_argument("--seed", type=int, default=0, help="the seed of --random's shapes")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--budget", type=float, default=None, help="timing seconds per row (default 0.4, quick 0.25)")
    p.add_argument("--match", default=None, help="only the rows whose name holds one of these comma-separated strings")
    a = p.parse_args()
    budget = a.budget or (0.25 if a.quick else 0.4)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print("each key is warmed first (its first call tunes it); then ours and the peer alternate, paired")
    results = []
    if a.random:
        print(f"random shapes: --random {a.random} --seed {a.seed}")
        sources = [lambda quick: random_rows(a.random, a.seed, set(a.ops.split(",")))]
    else:
        sources = [heldout_rows] if a.heldout else [OPS[op] for op in a.ops.split(",")]
    for rows in sources:
        for name, ours, peer, what in rows(a.quick):
            if a.match and not any(m in name for m in a.match.split(",")):
                continue
            known = dict(dispatcher._state.choices)
            t0 = time.perf_counter()
            ours()  # tunes the key
            tune_s = time.perf_counter() - t0
            # the kernel the dispatcher chose for this row's key (a key an earlier row tuned: as it chose then)
            new = [(k, c.name) for k, c in dispatcher._state.choices.items() if known.get(k) is not c]
            kernel = new[0][1] if new else "(an earlier row's key)"
            o, pr, ratio = paired(ours, peer, budget)
            ok = ratio <= RATIO or o - pr <= SLACK_US
            r = {"row": name, "peer": what, "ours_us": o, "peer_us": pr, "ratio": ratio, "extra_us": o - pr,
                 "pass": ok, "tune_s": tune_s, "kernel": kernel, "decision": _decision(new[0][0]) if new else None}
            results.append(r)
            verdict = "PASS" if ok else "MISS"
            print(f"{verdict} {ratio:6.2f}x  ours {o:10.1f} us  peer {pr:10.1f} us  {name}  [{kernel}]", flush=True)
    results.sort(key=lambda r: (r["pass"], -r["ratio"]), reverse=True)
    print()
    print(tabulate([[r["row"], r["peer"], f"{r['peer_us']:.1f}", r["kernel"], f"{r['ours_us']:.1f}",
                     f"{r['ratio']:.2f}x", f"{r['extra_us']:+.1f}", "pass" if r["pass"] else "MISS"] for r in results],
                   headers=["row", "peer", "peer us", "our kernel", "ours us", "ours / peer", "extra us",
                            f"<= {RATIO}x or +{SLACK_US:g} us"]))
    misses = sum(not r["pass"] for r in results)
    print(f"\n{len(results) - misses} of {len(results)} rows meet the target; worst: {results[-1]['row']} "
          f"({results[-1]['ratio']:.2f}x); load average {os.getloadavg()[0]:.2f} at the end")
    if a.json:
        Path(a.json).write_text(json.dumps({"cpu": cpu_model(), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
