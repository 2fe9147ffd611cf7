"""Benchmark all_reduce on a local gloo group: bandwidth per message size, and a model's gradient list.

    python scripts/bench_all_reduce.py [--world-size 2] [--max-mb 64] [--budget 0.5]

Part 1, per message size (one float32 tensor, 1 KB to 64 MB) and kernel: the time (the slowest
rank's median), the algorithm bandwidth ``algbw = bytes / time`` and the bus bandwidth ``busbw =
algbw * 2 (n - 1) / n`` (the nccl-tests convention: what each link carries), and each kernel's time
relative to the library collective (``torch``). Part 2: the time to all-reduce the 200 gradients of
a small model (``core.ops.all_reduce.model_shapes``, float32) with per-tensor ``torch``, ``ring``,
every ``fused`` bucket size, one flat buffer, and the variant the autotuner picks in lockstep.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def _times(fns: dict[str, Callable[[], Any]], budget: float) -> dict[str, float]:
    """Each function's median seconds per call (the slowest rank's), timed round-robin so that a
    change in the machine's load hits every kernel alike; every rank makes the same calls."""
    import torch.distributed as dist

    dist.barrier()
    first = []
    for fn in fns.values():  # warm-up, and the cost of one call
        t0 = time.perf_counter()
        fn()
        first.append(time.perf_counter() - t0)
    worst = torch.tensor(first, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    rounds = max(5, min(200, int(budget * len(fns) / max(float(worst.sum()), 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    medians = torch.tensor([statistics.median(samples[name]) for name in fns], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    return dict(zip(fns, medians.tolist()))


def _worker(rank: int, world_size: int, max_mb: int, budget: float) -> dict[str, Any]:
    from core import dispatcher
    from core.ops import get_spec
    from core.ops.all_reduce import model_shapes
    from plugins.fused.all_reduce import fused
    from plugins.torch_backend.all_reduce import library, ring

    gen = torch.Generator().manual_seed(1234 + rank)
    kernels = {"torch": library, "ring": ring, "fused[bucket_mb=25]": lambda t, **kw: fused(t, bucket_mb=25, **kw)}
    sizes = []
    nbytes = 1 << 10
    while nbytes <= max_mb << 20:
        sizes.append(nbytes)
        nbytes <<= 2
    per_size = []
    for nbytes in sizes:
        x = torch.randn(nbytes // 4, generator=gen)
        row: dict[str, Any] = {"bytes": nbytes}
        row.update(_times({name: (lambda fn=fn: fn(x, op="sum", group=None)) for name, fn in kernels.items()}, budget))
        per_size.append(row)

    grads = [torch.randn(s, generator=gen) for s in model_shapes()]
    spec = get_spec("all_reduce")
    args, attrs = spec.prepare((grads,), {"op": "sum"})
    decision = dispatcher.tuner().decide(spec, spec.key(args, attrs), args, attrs, budget=budget, use_cache=False)
    variants = {"torch (per tensor)": library, "ring (per tensor)": ring}
    for mb in (1, 4, 25):
        variants[f"fused[bucket_mb={mb}]"] = lambda t, mb=mb, **kw: fused(t, bucket_mb=mb, **kw)
    variants["fused, one flat buffer"] = lambda t, **kw: fused(t, bucket_mb=1 << 20, **kw)
    tuned = dispatcher.tuner().variant("all_reduce", decision.winner)
    variants[f"tuned: {decision.winner}"] = tuned.fn
    model = _times({name: (lambda fn=fn: fn(grads, op="sum", group=None)) for name, fn in variants.items()}, budget)
    total = sum(g.numel() * g.element_size() for g in grads)
    return {"sizes": per_size, "model": model, "model_bytes": total, "kernels": list(kernels),
            "threads": torch.get_num_threads()}


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.4g} {unit}"
        nbytes /= 1024
    return str(nbytes)


def main() -> int:
    from tabulate import tabulate

    from core import distributed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--max-mb", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timing per (size, kernel), about")
    a = p.parse_args()
    n = a.world_size
    result = distributed.run_local_group(n, _worker, a.max_mb, a.budget, timeout=1800)[0]

    factor = 2 * (n - 1) / n
    rows = []
    for row in result["sizes"]:
        for name in result["kernels"]:
            t = row[name]
            algbw = row["bytes"] / t / 1e9
            rows.append([_human(row["bytes"]), name, f"{t * 1e3:.4g}", f"{algbw:.3g}", f"{algbw * factor:.3g}",
                         f"{t / row['torch']:.2f}x"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"all_reduce, float32, world size {n} on loopback gloo, {result['threads']} intra-op thread(s) per rank, "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the end")
    print(tabulate(rows, headers=["message", "kernel", "ms", "algbw GB/s", "busbw GB/s", "time vs torch"]))
    print()
    base = result["model"]["torch (per tensor)"]
    rows = [[name, f"{t * 1e3:.4g}", f"{base / t:.2f}x"] for name, t in result["model"].items()]
    print(f"gradient list: 200 float32 tensors, {_human(result['model_bytes'])} in all")
    print(tabulate(rows, headers=["kernel", "ms", "speedup vs torch"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
