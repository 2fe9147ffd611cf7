"""Triton precision_cast for CUDA: statistics with atomics, then one rounding kernel.

``_cast_kernel`` loads a block, optionally gathers the statistics (the block's largest finite |x| as
bits, ``atomic_max``; its non-finite count, ``atomic_add``), optionally multiplies by the scale, and
rounds with integer arithmetic on the compute value's bits, as the C++ kernel does: the significand is
split at the target's spacing into the kept count and the remainder; the count goes up by nearest-even,
or when a Philox draw (``tl.randint``) is below the remainder as a 32-bit fraction of the spacing. The
target bits are ``((exponent - emin) << man) + count``. scaling="none" is that one kernel; "amax"
runs it first as a statistics-only pass, computes the scale on the device (no host sync) and runs it
again to cast. bfloat16 inputs are read as their bits (the interpreter's numpy has no bfloat16).
"""
from __future__ import annotations

import os
import time

import torch
import triton
import triton.language as tl

from core.ops.precision_cast import FORMATS, CastResult, Format, amax_scale
from core.spec import bucket

INTERPRET_BLOCK = 2048  # the interpreter runs each program in numpy: fewer, larger programs; no autotuning


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def _round_bits(v, draw, over, UINT: tl.constexpr, SRC_MAN: tl.constexpr, SRC_BIAS: tl.constexpr,
                WIDTH: tl.constexpr, MAN: tl.constexpr, EMIN: tl.constexpr, MAX_BITS: tl.constexpr,
                NAN_BITS: tl.constexpr, BITS: tl.constexpr, STOCHASTIC: tl.constexpr):
    """The target bits (as UINT) of v: round at the target's spacing, then overflow, inf, NaN, sign."""
    u = v.to(UINT, bitcast=True)
    a = u & ((1 << (WIDTH - 1)) - 1)
    negative = u >> (WIDTH - 1)
    field = (a >> SRC_MAN).to(tl.int32)
    sig = tl.where(field > 0, (a & ((1 << SRC_MAN) - 1)) | (1 << SRC_MAN), a)
    exp = tl.maximum(field, 1) - SRC_BIAS
    texp = tl.maximum(exp, EMIN)
    drop = SRC_MAN - MAN + texp - exp  # significand bits below the target's spacing
    if STOCHASTIC:
        d = tl.minimum(drop, WIDTH - 1).to(UINT)
        keep = sig >> d
        rem = sig - (keep << d)
        left = tl.where(drop <= 32, 32 - drop, 0).to(UINT)
        right = tl.where(drop <= 32, 0, tl.minimum(drop - 32, WIDTH - 1)).to(UINT)
        frac = (rem << left) >> right  # rem / 2**drop as a 32-bit fraction
        count = keep + (draw.to(UINT) < frac).to(UINT)
    else:
        d = tl.minimum(drop, SRC_MAN + 2).to(UINT)  # from there on: below half the spacing
        t = sig >> (d - 1)  # the kept count and the round bit
        sticky = ((t << (d - 1)) != sig).to(UINT)
        count = (t >> 1) + ((t & 1) & (sticky | ((t >> 1) & 1)))  # half to even
    out = ((texp - EMIN).to(UINT) << MAN) + count
    out = tl.where(out > MAX_BITS, over.to(UINT), out)
    inf = ((1 << (WIDTH - SRC_MAN - 1)) - 1) << SRC_MAN
    out = tl.where(a >= inf, tl.where(a == inf, over.to(UINT), NAN_BITS), out)
    return out | (negative << (BITS - 1))


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, n_bucket, scale_ptr, amax_ptr, nonfinite_ptr, over, seed,
                 BF16_BITS: tl.constexpr, WIDE: tl.constexpr, GATHER: tl.constexpr, CAST: tl.constexpr,
                 SCALED: tl.constexpr, STOCHASTIC: tl.constexpr, MAN: tl.constexpr, EMIN: tl.constexpr,
                 MAX_BITS: tl.constexpr, NAN_BITS: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if BF16_BITS:  # bfloat16 read as int16 bits: shifted into a float32's top half it is that value
        raw = tl.load(x_ptr + offs, mask=mask, other=0)
        x = ((raw.to(tl.uint16).to(tl.uint32)) << 16).to(tl.float32, bitcast=True)
    elif WIDE:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if WIDE:
        UINT: tl.constexpr = tl.uint64
        SRC_MAN: tl.constexpr = 52
        SRC_BIAS: tl.constexpr = 1023
        WIDTH: tl.constexpr = 64
    else:
        UINT: tl.constexpr = tl.uint32
        SRC_MAN: tl.constexpr = 23
        SRC_BIAS: tl.constexpr = 127
        WIDTH: tl.constexpr = 32
    if GATHER:
        a = x.to(UINT, bitcast=True) & ((1 << (WIDTH - 1)) - 1)
        inf = ((1 << (WIDTH - SRC_MAN - 1)) - 1) << SRC_MAN
        finite = a < inf
        top = tl.max(tl.where(finite & mask, a, 0), axis=0)
        # to float32 (rounding is monotone, so this is the float32 max), whose bits order like values
        top32 = top.to(x.dtype, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
        tl.atomic_max(amax_ptr, top32)
        tl.atomic_add(nonfinite_ptr, tl.sum((~finite & mask).to(tl.int64), axis=0))
    if CAST:
        v = x
        if SCALED:
            v = x * tl.load(scale_ptr).to(x.dtype)
        draw = tl.zeros([BLOCK], dtype=tl.uint32)
        if STOCHASTIC:
            draw = tl.randint(seed, offs).to(tl.uint32)
        bits = _round_bits(v, draw, over, UINT, SRC_MAN, SRC_BIAS, WIDTH, MAN, EMIN, MAX_BITS, NAN_BITS, BITS,
                           STOCHASTIC)
        if BITS == 8:
            tl.store(y_ptr + offs, bits.to(tl.uint8), mask=mask)
        else:
            tl.store(y_ptr + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


CONFIGS = [  # an elementwise pass: the block size and warps only trade occupancy for per-program work
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]
KEY = ["n_bucket", "WIDE", "GATHER", "CAST", "SCALED", "STOCHASTIC", "MAN", "BITS"]  # n_bucket: n to a power of 2
_cast_tuned = triton.autotune(configs=CONFIGS, key=KEY, reset_to_zero=["amax_ptr", "nonfinite_ptr"])(_cast_kernel)


def _launch(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, amax_bits: torch.Tensor, nonfinite: torch.Tensor,
            over: int, seed: int, *, gather: bool, cast: bool, scaled: bool, stochastic: bool, fmt: Format) -> None:
    n = x.numel()
    flags = dict(BF16_BITS=x.dtype == torch.int16, WIDE=x.dtype == torch.float64, GATHER=gather, CAST=cast,
                 SCALED=scaled, STOCHASTIC=stochastic, MAN=fmt.man_bits, EMIN=fmt.emin, MAX_BITS=fmt.max_bits,
                 NAN_BITS=fmt.nan_bits, BITS=fmt.bits)
    args = (x, y, n, bucket(n), scale, amax_bits, nonfinite, over, seed)
    if _interpreting():
        _cast_kernel[(triton.cdiv(n, INTERPRET_BLOCK),)](*args, **flags, BLOCK=INTERPRET_BLOCK)
    else:
        _cast_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](*args, **flags)


def precision_cast(x: torch.Tensor, *, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool, margin: int,
                   seed: int) -> CastResult:
    """The launcher: x of any layout; ``seed`` is an int here (the fused module draws one for None)."""
    fmt = FORMATS[dtype]
    dev = x.device
    y = torch.empty(x.shape, dtype=dtype, device=dev)
    amax_bits = torch.zeros((), dtype=torch.int32, device=dev)
    nonfinite = torch.zeros((), dtype=torch.int64, device=dev)
    scale = torch.ones((), dtype=torch.float32, device=dev)
    if x.numel() == 0:
        return CastResult(y=y, scale=scale, amax=amax_bits.view(torch.float32), nonfinite=nonfinite)
    xc = x.detach().contiguous()
    if xc.dtype == torch.bfloat16:
        xc = xc.view(torch.int16)
    yv = y.view(fmt.int_dtype)
    over = fmt.overflow_bits(saturate)
    stochastic = rounding == "stochastic"
    if scaling == "amax":
        _launch(xc, yv, scale, amax_bits, nonfinite, over, seed, gather=True, cast=False, scaled=False,
                stochastic=False, fmt=fmt)
        scale = amax_scale(amax_bits.view(torch.float32), dtype, margin)
        _launch(xc, yv, scale, amax_bits, nonfinite, over, seed, gather=False, cast=True, scaled=True,
                stochastic=stochastic, fmt=fmt)
    else:
        _launch(xc, yv, scale, amax_bits, nonfinite, over, seed, gather=True, cast=True, scaled=False,
                stochastic=stochastic, fmt=fmt)
    return CastResult(y=y, scale=scale, amax=amax_bits.view(torch.float32), nonfinite=nonfinite)


def gpu_check(device: str = "cuda", *, check_log2: int = 22, time_log2: int = 26, reps: int = 10) -> list[dict]:
    """Full-size check on a real GPU: every target x scaling x rounding against the torch kernel on the
    same 2**22-element tensor (the spec's compare rule: bit-exact for nearest, neighbours for
    stochastic), every spec edge case against the reference, and the time at 2**26 elements. (The
    tests run it on the CPU under the interpreter at small sizes.)"""
    from core.ops.precision_cast import SPEC
    from core.spec import Sample
    from core.tuning import judge
    from plugins.reference.precision_cast import precision_cast as reference
    from plugins.torch_backend.precision_cast import precision_cast as torch_kernel

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    check_x = (torch.randn(1 << check_log2, generator=gen) * 64).to(device)
    time_x = torch.randn(1 << time_log2, generator=gen).to(device)
    for dtype in FORMATS:
        for scaling in ("none", "amax"):
            for rounding in ("nearest", "stochastic"):
                attrs = dict(dtype=dtype, rounding=rounding, scaling=scaling, saturate=False, margin=0, seed=1234)
                case = f"{str(dtype).removeprefix('torch.')}-{scaling}-{rounding}"
                out = precision_cast(check_x, **attrs)
                verdict = SPEC.compare(out, torch_kernel(check_x, **attrs), Sample(args=(check_x,), attrs=attrs))
                precision_cast(time_x, **attrs)  # the first call autotunes: keep it out of the measurement
                sync()
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    precision_cast(time_x, **attrs)
                    sync()
                    times.append((time.perf_counter() - t0) * 1e3)
                ms = sorted(times)[len(times) // 2]
                moved = time_x.numel() * (4 + dtype.itemsize)
                note = f"{moved / ms / 1e6:.0f} GB/s at 2**{time_log2} float32; {verdict.reason}"
                rows.append({"kernel": "fused-triton", "case": case, "ok": verdict.ok, "max_error": verdict.max_error,
                             "ms": ms, "note": note})
    for name, factory in SPEC.edge_cases.items():
        sample = factory(torch.Generator().manual_seed(1), device)
        attrs = dict(sample.attrs)
        if attrs["rounding"] == "stochastic" and attrs["seed"] is None:
            attrs["seed"] = 99
        out = precision_cast(sample.args[0], **attrs)
        ref = reference(sample.args[0].cpu(), **attrs)
        verdict = judge(SPEC, out, ref, Sample(args=(sample.args[0].cpu(),), attrs=attrs))
        rows.append({"kernel": "fused-triton", "case": f"edge:{name}", "ok": verdict.ok,
                     "max_error": verdict.max_error, "ms": float("nan"), "note": verdict.reason})
    return rows
