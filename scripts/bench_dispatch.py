"""Dispatch overhead on a warm cache: dispatcher.attention(...) against calling the chosen kernel directly.

Tiny inputs (so the kernel itself is as cheap as possible); the difference of the two medians is the
cost of the dispatcher's hot path (bind, verify, key, dict lookup). Target: at most 5 microseconds.

    python scripts/bench_dispatch.py
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("SWITCHYARD_CACHE_DIR", tempfile.mkdtemp(prefix="switchyard-bench-"))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from core import dispatcher  # noqa: E402


def per_call_us(fn, n: int = 20000, repeats: int = 7) -> float:
    for _ in range(1000):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    torch.set_num_threads(1)
    q = torch.randn(1, 1, 1, 8)
    k = torch.randn(1, 1, 4, 8)
    v = torch.randn(1, 1, 4, 8)
    dispatcher.attention(q, k, v, causal=True)  # tune the key once
    key = dispatcher.explain("attention", q, k, v, causal=True).key
    choice = dispatcher._state.choices[("attention", key)]
    kernel = choice.fn
    scale = 1 / 8 ** 0.5
    with torch.no_grad():
        direct = per_call_us(lambda: kernel(q, k, v, causal=True, scale=scale, attn_mask=None, return_lse=False))
        via_attr = per_call_us(lambda: dispatcher.attention(q, k, v, causal=True))
        via_call = per_call_us(lambda: dispatcher.call("attention", q, k, v, causal=True))

        # The hot path alone: the same call with the chosen kernel swapped for a function that returns
        # at once, against calling that function directly. This isolates the dispatcher's own cost
        # from the kernel's run-to-run noise, which on a shared machine is larger than the overhead.
        def noop(*args, **attrs):
            return None

        dispatcher._state.choices[("attention", key)] = type(choice)(noop, "noop")
        noop_direct = per_call_us(lambda: noop(q, k, v, causal=True, scale=scale, attn_mask=None, return_lse=False))
        noop_attr = per_call_us(lambda: dispatcher.attention(q, k, v, causal=True))
        noop_call = per_call_us(lambda: dispatcher.call("attention", q, k, v, causal=True))
        dispatcher._state.choices[("attention", key)] = choice
    rows = [
        [f"{choice.name} called directly", f"{direct:.2f}", ""],
        ["dispatcher.attention(...)", f"{via_attr:.2f}", f"{via_attr - direct:+.2f}"],
        ['dispatcher.call("attention", ...)', f"{via_call:.2f}", f"{via_call - direct:+.2f}"],
        ["no-op kernel called directly", f"{noop_direct:.2f}", ""],
        ["dispatcher.attention(...) -> no-op", f"{noop_attr:.2f}", f"{noop_attr - noop_direct:+.2f}"],
        ['dispatcher.call("attention", ...) -> no-op', f"{noop_call:.2f}", f"{noop_call - noop_direct:+.2f}"],
    ]
    print(f"chosen kernel: {choice.name}; torch threads: 1; tiny inputs q[1,1,1,8], k/v[1,1,4,8]")
    print(tabulate(rows, headers=["path", "us per call", "overhead us"]))
    print(f"\ndispatch overhead (hot path alone): {noop_attr - noop_direct:.2f} us per call via dispatcher.attention, "
          f"{noop_call - noop_direct:.2f} us via dispatcher.call (target <= 5 us); "
          f"with the real kernel: {via_attr / direct:.2f}x the direct call")


if __name__ == "__main__":
    main()
