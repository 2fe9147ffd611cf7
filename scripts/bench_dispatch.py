"""Dispatch overhead on a warm cache: dispatcher.attention(...) against calling the chosen kernel directly.

Tiny inputs (so the kernel itself is as cheap as possible); the difference of the two medians is the
cost of the dispatcher's hot path (bind, verify, key, dict lookup). Target: at most 5 microseconds.
Also: a plain call of _dispatch (spec.bind on every call, no compile branch: the entry point before the
generated entries and the compile branch) beside today's,
the custom-op route (torch.ops.switchyard.attention, what a compiled graph calls) called eagerly, and
a small model of core.nn.Attention layers, eager against torch.compile.

Then precision_cast's hot path with a no-op kernel, served from the memo of fast keys (warm calls)
and with the memo off; warm decode calls right after a large kernel, with the memo key read in C++ and
in Python; and one op per torch.compile'd call against the peer compiled the same way.

    python scripts/bench_dispatch.py [--no-model]
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time

if "SWITCHYARD_CACHE_DIR" not in os.environ:  # a fresh tuning cache, but the user's compiled kernels
    from core.cache import cache_dir  # noqa: E402

    os.environ.setdefault("SWITCHYARD_BUILD_DIR", str(cache_dir() / "build"))
    os.environ["SWITCHYARD_CACHE_DIR"] = tempfile.mkdtemp(prefix="switchyard-bench-")

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
        result = torch.empty(1, 1, 1, 8)

        def noop(*args, **attrs):
            return result

        dispatcher._state.choices[("attention", key)] = type(choice)(noop, "noop")
        noop_direct = per_call_us(lambda: noop(q, k, v, causal=True, scale=scale, attn_mask=None, return_lse=False))
        noop_attr = per_call_us(lambda: dispatcher.attention(q, k, v, causal=True))
        noop_call = per_call_us(lambda: dispatcher.call("attention", q, k, v, causal=True))
        spec = dispatcher._SPECS["attention"]

        def before(*args, **attrs):  # the entry point before the generated entries and the compile branch
            return dispatcher._dispatch(spec, args, attrs)

        before_entry = per_call_us(lambda: before(q, k, v, causal=True))
        op = torch.ops.switchyard.attention
        custom_op = per_call_us(lambda: op(q, k, v, None, True, None, False, False), n=5000)
        dispatcher._state.choices[("attention", key)] = choice
    rows = [
        [f"{choice.name} called directly", f"{direct:.2f}", ""],
        ["dispatcher.attention(...)", f"{via_attr:.2f}", f"{via_attr - direct:+.2f}"],
        ['dispatcher.call("attention", ...)', f"{via_call:.2f}", f"{via_call - direct:+.2f}"],
        ["no-op kernel called directly", f"{noop_direct:.2f}", ""],
        ["dispatcher.attention(...) -> no-op", f"{noop_attr:.2f}", f"{noop_attr - noop_direct:+.2f}"],
        ['dispatcher.call("attention", ...) -> no-op', f"{noop_call:.2f}", f"{noop_call - noop_direct:+.2f}"],
        ["plain _dispatch (bind every call) -> no-op", f"{before_entry:.2f}", f"{before_entry - noop_direct:+.2f}"],
        ["torch.ops.switchyard.attention -> no-op", f"{custom_op:.2f}", f"{custom_op - noop_direct:+.2f}"],
    ]
    print(f"chosen kernel: {choice.name}; torch threads: 1; tiny inputs q[1,1,1,8], k/v[1,1,4,8]")
    print(tabulate(rows, headers=["path", "us per call", "overhead us"]))
    print(f"\ndispatch overhead (hot path alone): {noop_attr - noop_direct:.2f} us per call via dispatcher.attention, "
          f"{noop_call - noop_direct:.2f} us via dispatcher.call (target <= 5 us); "
          f"with the real kernel: {via_attr / direct:.2f}x the direct call")
    print(f"today's entry (generated, with the compile branch) against a plain _dispatch: "
          f"{noop_attr - before_entry:+.2f} us; the custom-op route: {custom_op - noop_direct:+.2f} us per call")
    warm_calls()
    after_a_large_kernel()
    compiled_calls()
    if "--no-model" not in sys.argv:
        small_model()


@contextlib.contextmanager
def _memo_off(spec):
    """The memo key set aside for the block (the C++ one or the spec's fast_key): every call takes
    verify, the key and the choice."""
    memo_key = dispatcher._memo_key[spec.name]
    dispatcher._memo_key[spec.name] = None
    try:
        yield
    finally:
        dispatcher._memo_key[spec.name] = memo_key


def warm_calls() -> None:
    """precision_cast's hot path with a no-op kernel: a warm call (served from the memo of fast keys)
    against the same call with the memo off (the spec's fast_key set aside: verify, key, choice, the
    kernel called with its attributes as keywords)."""
    x = torch.randn(16)
    dtype = torch.float16
    for _ in range(2):
        dispatcher.precision_cast(x, dtype=dtype)  # tune, then warm the memo
    spec = dispatcher._SPECS["precision_cast"]
    (fast,) = dispatcher._state.warm["precision_cast"]
    key, choice, call, attrs = dispatcher._state.warm["precision_cast"][fast]
    result = call(x)

    def noop(*args, **attrs):
        return result

    dispatcher._state.warm["precision_cast"][fast] = (key, choice, noop, attrs)
    dispatcher._state.choices[("precision_cast", key)] = type(choice)(noop, "noop")
    direct = per_call_us(lambda: noop(x))
    warm = per_call_us(lambda: dispatcher.precision_cast(x, dtype=dtype))
    try:
        with _memo_off(spec):
            cold = per_call_us(lambda: dispatcher.precision_cast(x, dtype=dtype))
    finally:
        dispatcher._state.choices[("precision_cast", key)] = choice
        dispatcher._state.warm.clear()
    print(f"\nprecision_cast hot path (no-op kernel, 16 elements): {warm - direct:.2f} us per warm call "
          f"(the memo of fast keys), {cold - direct:.2f} us with the memo off (verify, key and choice each call)")
    cast_sizes(spec)


def cast_sizes(spec) -> None:
    """The dispatched cast against the fused C++ call it ends in (same tensor, flags worked out), at sizes
    where the caches go cold between calls, warm calls and the memo off, alternated."""
    from plugins.fused import _build
    from plugins.fused import precision_cast as fused_cast

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    fused_cast._library()
    raw_op = fused_cast._cast_ops[_build.default_isa()]
    flags = fused_cast.cpu_flags(torch.float16, "nearest", "none", False, 0)
    rows = []
    mode = os.environ.get("SWITCHYARD_AUTOTUNE")
    os.environ["SWITCHYARD_AUTOTUNE"] = "off"  # the highest priority that passes validation: the fused kernel
    dispatcher.reset()
    try:
        for n in (16, 1 << 16, 1 << 20):
            rows.append(_cast_row(spec, raw_op, flags, n))
    finally:
        if mode is None:
            del os.environ["SWITCHYARD_AUTOTUNE"]
        else:
            os.environ["SWITCHYARD_AUTOTUNE"] = mode
        dispatcher.reset()
    print(f"\nprecision_cast float32 -> float16 as called, over the C++ call it ends in ({_build.default_isa()} "
          f"build, {torch.get_num_threads()} threads; the kernel chosen for the key named)")
    print(tabulate(rows, headers=["elements", "chosen", "C++ call us", "warm call extra us", "memo off extra us"]))


def _cast_row(spec, raw_op, flags: int, n: int) -> list:
    """One size: the C++ call alone, a warm call and a call with the memo off, alternated; medians."""
    x = torch.randn(n)
    dispatcher.precision_cast(x, dtype=torch.float16)  # validate the key (autotuning off: no timing)
    calls = max(20, 2000 >> max(0, n.bit_length() - 12))
    ts: dict[str, list[float]] = {"raw": [], "warm": [], "off": []}
    for _ in range(7):
        ts["raw"].append(per_call_us(lambda: raw_op(x, flags, 0), n=calls, repeats=1))
        ts["warm"].append(per_call_us(lambda: dispatcher.precision_cast(x, dtype=torch.float16), n=calls, repeats=1))
        with _memo_off(spec):
            ts["off"].append(per_call_us(lambda: dispatcher.precision_cast(x, dtype=torch.float16), n=calls, repeats=1))
    raw, warm, off = (statistics.median(ts[k]) for k in ("raw", "warm", "off"))
    chosen = dispatcher.explain("precision_cast", x, dtype=torch.float16).chosen
    return [n, chosen, f"{raw:.2f}", f"{warm - raw:+.2f}", f"{off - raw:+.2f}"]


def after_a_large_kernel() -> None:
    """Warm decode calls right after a kernel that streamed the keys and values through the caches (SDPA
    on the same tensors before every timed call, in a shuffled order each round): the dispatched call over
    the bare kernel it is bound to, with the memo key read in C++ (core.hotpath) and by the spec's Python
    fast_key. Back to back, the hot path costs about 3 us; here its code and data come back cold."""
    import random

    import torch.nn.functional as F

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    spec = dispatcher._SPECS["attention"]
    native = dispatcher._memo_key["attention"]
    python = dispatcher._python_memo_key(spec)
    if native is not dispatcher._hotpath.keys().get("attention"):
        print("\nafter a large kernel: the C++ memo keys are not in use here "
              f"({dispatcher._hotpath.unavailable_reason() or 'not built'})")
        return
    rows = []
    attrs = {"attn_mask": None, "causal": True, "scale": None, "return_lse": False}
    for dt, B, Lk in ((torch.bfloat16, 4, 128), (torch.float32, 1, 128), (torch.bfloat16, 1, 128),
                      (torch.float32, 8, 256), (torch.bfloat16, 1, 1024)):
        q = torch.randn(B, 16, 1, 128, dtype=dt)
        k, v = (torch.randn(B, 16, Lk, 128, dtype=dt) for _ in range(2))
        for keys in (python, native):  # a memo entry under each key
            dispatcher._memo_key["attention"] = keys
            for _ in range(2):
                dispatcher.attention(q, k, v, causal=True)
        _, choice, bound, _ = dispatcher._state.warm["attention"][native((q, k, v), attrs)]
        ways = {"bare": None, "C++ key": native, "Python key": python}
        ts: dict[str, list[float]] = {w: [] for w in ways}
        order, rng = list(ways), random.Random(0)
        try:
            for _ in range(300):
                rng.shuffle(order)
                for w in order:
                    dispatcher._memo_key["attention"] = ways[w] or native
                    F.scaled_dot_product_attention(q, k, v)
                    t0 = time.perf_counter()
                    if ways[w] is None:
                        bound(q, k, v)
                    else:
                        dispatcher.attention(q, k, v, causal=True)
                    ts[w].append((time.perf_counter() - t0) * 1e6)
        finally:
            dispatcher._memo_key["attention"] = native
        med = {w: statistics.median(t) for w, t in ts.items()}
        rows.append([f"{str(dt).split('.')[-1]} B={B} H=16 Lq=1 Lk={Lk} D=128", choice.name, f"{med['bare']:.1f}",
                     f"{med['C++ key'] - med['bare']:+.1f}", f"{med['Python key'] - med['bare']:+.1f}"])
    print("\nwarm decode calls right after SDPA streamed the same keys and values (each timed call follows one; "
          f"{torch.get_num_threads()} threads)")
    print(tabulate(rows, headers=["call", "chosen", "bare kernel us", "C++ memo key extra us", "Python key extra us"]))


def compiled_calls() -> None:
    """One op in a torch.compile'd function (inductor), per call, against the peer compiled the same way:
    the compiled function's own overhead is in both, the custom-op boundary in ours."""
    import torch.nn.functional as F

    q, k, v = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    x = torch.randn(16)
    pairs = {
        "attention [1,1,1,8] x [1,1,4,8]": (
            torch.compile(lambda q, k, v: dispatcher.attention(q, k, v), fullgraph=True),
            torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), fullgraph=True), (q, k, v)),
        "precision_cast 16 -> float16": (
            torch.compile(lambda x: dispatcher.precision_cast(x, dtype=torch.float16).y, fullgraph=True),
            torch.compile(lambda x: x.to(torch.float16), fullgraph=True), (x,)),
    }
    rows = []
    with torch.no_grad():
        for name, (ours, peer, args) in pairs.items():
            ours(*args), peer(*args)
            times: dict[str, list[float]] = {"o": [], "p": []}
            for _ in range(5):  # alternated
                times["o"].append(per_call_us(lambda: ours(*args), n=3000, repeats=1))
                times["p"].append(per_call_us(lambda: peer(*args), n=3000, repeats=1))
            o, p = statistics.median(times["o"]), statistics.median(times["p"])
            rows.append([name, f"{o:.1f}", f"{p:.1f}", f"{o - p:+.1f}"])
    print("\ncompiled (inductor, fullgraph, no_grad, 1 thread): one op per compiled call")
    print(tabulate(rows, headers=["call", "switchyard us", "peer us", "extra us"]))


def small_model() -> None:
    """Two pre-norm blocks of core.nn.Attention (causal, GQA) and an MLP: eager against torch.compile."""
    from core.nn import Attention

    class Block(torch.nn.Module):
        def __init__(self, e: int) -> None:
            super().__init__()
            self.n1, self.n2 = torch.nn.LayerNorm(e), torch.nn.LayerNorm(e)
            self.attn = Attention(e, 8, 2, causal=True)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(e, 4 * e), torch.nn.GELU(), torch.nn.Linear(4 * e, e))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.n1(x))[0]
            return x + self.mlp(self.n2(x))

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = torch.nn.Sequential(Block(128), Block(128)).eval()
    x = torch.randn(2, 128, 128)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    with torch.no_grad():
        t0 = time.perf_counter()
        want = compiled(x)
        first = time.perf_counter() - t0
        assert torch.allclose(want, model(x), rtol=1e-4, atol=1e-4)
        eager_ms, comp_ms = [], []
        for _ in range(15):  # alternated, so load drifts hit both alike
            for fn, out in ((model, eager_ms), (compiled, comp_ms)):
                t0 = time.perf_counter()
                fn(x)
                out.append((time.perf_counter() - t0) * 1e3)
    e, c = statistics.median(eager_ms), statistics.median(comp_ms)
    print(f"\nsmall model (2 blocks of core.nn.Attention E=128 H=8 KV=2 causal + MLP, B=2 L=128, 1 thread, "
          f"no_grad): eager {e:.2f} ms, torch.compile(inductor, fullgraph) {c:.2f} ms ({e / c:.2f}x); "
          f"first compiled call {first:.1f} s")


if __name__ == "__main__":
    main()
