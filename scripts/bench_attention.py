"""Fused attention on the CPU against SDPA: decode shapes, the prefill shape, and the side-by-side table.

    python scripts/bench_attention.py [--isa avx2] [--suite decode prefill table] [--reps 15] [--threads N]

``decode``: a representative subset of the issue's decode shapes (B 1-16, Hq 8-32, GQA ratio 1/4/8, Lq 1-8,
Lk 128-8192, D 64/128, float32 and bfloat16, causal bottom-right or not); each row times the fused kernel
called directly, ``dispatcher.attention`` as a user calls it (warm key), and the peer,
``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` (with the explicit bottom-right mask where
SDPA's top-left ``is_causal`` would differ), alternated in one process, and prints ours / SDPA's time
(target: at most 1.0). ``prefill``: the fused forward at B=1 H=8 L=2048 D=64 causal float32 against SDPA
(target: at most 1.25). ``table``: fused, torch, torch-sdpa and reference side by side, forward and
forward+backward, B=1, H=8, D=64 (``--lengths``). ``--isa avx2`` runs the fused kernels on the AVX2 build.
Ratios are taken on the best of the rounds (the least disturbed); the load average is printed around.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tabulate import tabulate  # noqa: E402

from core import dispatcher  # noqa: E402
from core.ops.attention import make_inputs  # noqa: E402
from plugins.fused import _build  # noqa: E402
from plugins.fused import attention as fused  # noqa: E402
from registry.loader import get_registry  # noqa: E402

BACKENDS = ("fused", "torch", "torch-sdpa", "reference")
DECODE = (  # B, Hq, Hkv, Lq, Lk, D, causal
    (1, 32, 8, 1, 1024, 128, False),
    (8, 16, 16, 1, 256, 64, False),
    (1, 32, 4, 1, 8192, 128, True),
    (16, 8, 8, 1, 2048, 64, False),
    (4, 32, 8, 4, 4096, 128, True),
    (1, 8, 1, 8, 512, 64, True),
    (16, 32, 32, 1, 128, 128, False),
    (2, 32, 4, 8, 2048, 64, False),
    (4, 16, 4, 2, 8192, 64, True),
)


def _best_of(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Each round calls every function once, in turn; returns the times in ms."""
    times: dict[str, list[float]] = {n: [] for n in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append((time.perf_counter() - t0) * 1e3)
    return times


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> Callable[[], Any]:
    """The peer as a user calls it directly."""
    Lq, Lk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if causal and Lq > 1:  # bottom-right causal: SDPA's is_causal is top-left aligned
        mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)


def decode(reps: int) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    rows, worst = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for B, Hq, Hkv, Lq, Lk, D, causal in DECODE:
            q, k, v = make_inputs(gen, "cpu", dtype, B, Hq, Hkv, Lq, Lk, D)
            scale = D ** -0.5
            fns = {
                "fused": lambda: fused.attention(q, k, v, causal=causal, scale=scale, attn_mask=None, return_lse=False),
                "dispatcher": lambda: dispatcher.attention(q, k, v, causal=causal, scale=scale),
                "sdpa": _sdpa(q, k, v, causal, scale),
            }
            with torch.no_grad():
                t = _best_of(fns, reps)
            best = {n: min(x) for n, x in t.items()}
            ratio, via = best["fused"] / best["sdpa"], best["dispatcher"] / best["sdpa"]
            worst.append(ratio)
            rows.append([str(dtype).removeprefix("torch."), B, Hq, Hkv, Lq, Lk, D, "yes" if causal else "",
                         f"{best['sdpa']:.3f}", f"{best['fused']:.3f}", f"{best['dispatcher']:.3f}",
                         f"{ratio:.2f}", f"{via:.2f}"])
    print(tabulate(rows, headers=["dtype", "B", "Hq", "Hkv", "Lq", "Lk", "D", "causal", "sdpa ms", "fused ms",
                                  "dispatcher ms", "fused/sdpa", "dispatcher/sdpa"]))
    print(f"decode: worst fused/sdpa {max(worst):.2f} (target <= 1.00), median {statistics.median(worst):.2f}")
    return worst


def prefill(reps: int) -> float:
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 8, 8, 2048, 2048, 64)
    fns = {
        "fused": lambda: fused.attention(q, k, v, causal=True, scale=0.125, attn_mask=None, return_lse=False),
        "dispatcher": lambda: dispatcher.attention(q, k, v, causal=True, scale=0.125),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125),
    }
    with torch.no_grad():
        t = _best_of(fns, max(3, reps // 3))
    best = {n: min(x) for n, x in t.items()}
    ratio = best["fused"] / best["sdpa"]
    print(f"prefill B=1 H=8 L=2048 D=64 causal float32 forward: sdpa {best['sdpa']:.1f} ms, fused "
          f"{best['fused']:.1f} ms ({ratio:.2f}x sdpa's time, target <= 1.25), dispatcher {best['dispatcher']:.1f} "
          f"ms ({best['dispatcher'] / best['sdpa']:.2f}x)")
    return ratio


def _runner(kernel: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backward: bool) -> Callable[[], None]:
    attrs = {"causal": causal, "scale": q.shape[-1] ** -0.5, "attn_mask": None, "return_lse": False}
    go = torch.randn_like(q)
    if not backward:
        def forward() -> None:
            with torch.no_grad():
                kernel.fn(q, k, v, **attrs)
        return forward
    if kernel.backward is not None and not kernel.differentiable:  # the reference: its gradient oracle
        def oracle() -> None:
            kernel.fn(q, k, v, **attrs)
            kernel.backward((q, k, v), attrs, (go,))
        return oracle
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    def both() -> None:
        kernel.fn(*leaves, **attrs).backward(go)
    return both


def table(lengths: list[int], reps: int, skip_reference_above: int) -> None:
    kernels = {k.backend: k for k in get_registry().kernels_for("attention")}
    missing = [b for b in BACKENDS if b not in kernels]
    if missing:
        sys.exit(f"bench_attention: backends {missing} are not loaded")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for L in lengths:
        q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 8, 8, L, L, 64)
        for causal in (False, True):
            for backward in (False, True):
                names = [b for b in BACKENDS if b != "reference" or L <= skip_reference_above]
                runs = {b: _runner(kernels[b], q, k, v, causal, backward) for b in names}
                times: dict[str, list[float]] = {b: [] for b in names}
                for b, run in runs.items():  # warm-up (the first fused call may build the C++ library)
                    if b != "reference":
                        run()
                for rep in range(reps):
                    for b, run in runs.items():
                        if b == "reference" and rep >= (2 if L <= 512 else 1):  # seconds to a minute a call
                            continue
                        t0 = time.perf_counter()
                        run()
                        times[b].append((time.perf_counter() - t0) * 1e3)
                best = {b: min(t) for b, t in times.items()}
                what = ("fwd+bwd" if backward else "fwd") + (" causal" if causal else "")
                row = [L, what]
                for b in BACKENDS:
                    row.append(f"{best[b]:.1f} / {statistics.median(times[b]):.1f}" if b in best else "")
                row += [f"{best[b] / best['fused']:.2f}x" for b in ("torch", "torch-sdpa")]
                rows.append(row)
    headers = ["L", "pass", *(f"{b} ms (best / median)" for b in BACKENDS), "torch / fused", "sdpa / fused"]
    print(tabulate(rows, headers=headers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", nargs="+", choices=("decode", "prefill", "table"), default=["decode", "prefill"])
    parser.add_argument("--isa", choices=_build.ISA_LEVELS, default=None, help="the fused kernels' build level")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="the table's sequence lengths")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-reference-above", type=int, default=2048, help="skip the numpy reference above this L")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    level = _build.forced_isa(args.isa) if args.isa else contextlib.nullcontext()
    with level:
        _build.library("attention")  # build (first use) outside the timings
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fused build {_build.default_isa()}, "
              f"load average before {os.getloadavg()[0]:.2f}")
        if "decode" in args.suite:
            decode(args.reps)
        if "prefill" in args.suite:
            prefill(args.reps)
        if "table" in args.suite:
            table(args.lengths, max(3, args.reps // 2), args.skip_reference_above)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
