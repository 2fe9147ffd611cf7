"""precision_cast in torch ops, CPU and CUDA, with the contract's overflow rules on any torch version.

Nearest: values are clamped to +-max finite before torch's own cast, so the cast never overflows and
only its round-to-nearest-even is relied on (torch's overflow behaviour for float8 changed between
releases); overflow is then written in from the comparison with the threshold. A float64 value is
first narrowed to float32 with round-to-odd, which makes the second rounding exact (Boldo and
Melquiond, "When double rounding is odd", 2005: it needs two more bits, float32 has 13 or more).

Stochastic: integer arithmetic on the value's bits: the significand is split at the target's spacing
into the kept count and the remainder, and the count goes up when a uniform 32-bit draw is below the
remainder as a 32-bit fraction of the spacing.

``torch-cast``: the peer itself, ``x.to(dtype)`` (``(x * s).to(dtype)`` with scaling="amax"), for the
keys where torch's own cast is the contract's: round to nearest from a float32, bfloat16 or float16
``x`` (float64 goes through float32, two roundings) and the overflow rule torch's cast has for that
target in this torch release (found by casting the contract's boundary values once, since it changed
between releases: torch 2.13 saturates float8_e4m3fn and gives inf for the others). The statistics
cost one allocation-free reduction (min and max, both finite exactly when every element is), and an
exact count only when some element is not finite.
"""
from __future__ import annotations

import math
import struct
from typing import Any

import torch

from core.ops.precision_cast import (FLOAT32_MAX, FORMATS, SOURCES, CastResult, Format, amax_scale, compute_dtype,
                                     special_values)
from registry import Kernel


def _stats(xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax as float32, non-finite count as int64), without a host sync."""
    a = xc.abs()
    finite = a <= torch.finfo(xc.dtype).max  # False for inf and NaN
    nonfinite = finite.numel() - finite.sum()
    if xc.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=xc.device), nonfinite
    amax = torch.where(finite, a, torch.zeros_like(a)).amax().float()
    return amax, nonfinite


def _round_to_odd(v: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounded toward zero, with the last bit set when inexact."""
    f = v.float()
    back = f.double()
    bits = f.view(torch.int32)
    bits = bits - (back.abs() > v.abs()).int()  # rounded away from zero: step back toward it
    bits = bits | (back != v).int()
    return bits.view(torch.float32)


def _signed(fmt: Format, magnitude: int, negative: torch.Tensor) -> torch.Tensor:
    """``magnitude`` bits with the sign of ``negative``, in the format's integer view dtype."""
    neg = magnitude | (1 << (fmt.bits - 1))
    if fmt.bits == 16:
        neg -= 1 << 16
    pos_t = torch.tensor(magnitude, dtype=fmt.int_dtype, device=negative.device)
    neg_t = torch.tensor(neg, dtype=fmt.int_dtype, device=negative.device)
    return torch.where(negative, neg_t, pos_t)


def _nearest(v: torch.Tensor, fmt: Format, saturate: bool) -> torch.Tensor:
    v32 = _round_to_odd(v) if v.dtype == torch.float64 else v
    y = v32.clamp(-fmt.max_finite, fmt.max_finite).to(fmt.dtype)
    if saturate:
        return y
    threshold = fmt.max_finite + fmt.top_spacing / 2
    a = v32.abs()
    beyond = (a >= threshold) if fmt.max_bits & 1 else (a > threshold)  # a tie goes to the even side
    over = _signed(fmt, fmt.overflow_bits(saturate), torch.signbit(v32))
    return torch.where(beyond, over, y.view(fmt.int_dtype)).view(fmt.dtype)


def _stochastic(v: torch.Tensor, fmt: Format, saturate: bool, seed: int | None) -> torch.Tensor:
    if v.dtype == torch.float32:
        man, bias, inf = 23, 127, 0x7F800000
        raw = v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        negative = raw >> 31
        a = raw & 0x7FFFFFFF
    else:
        man, bias, inf = 52, 1023, 0x7FF0000000000000
        raw = v.view(torch.int64)
        negative = (raw < 0).long()
        a = raw & 0x7FFFFFFFFFFFFFFF
    field = a >> man
    sig = torch.where(field > 0, (a & ((1 << man) - 1)) | (1 << man), a)
    exp = field.clamp(min=1) - bias
    texp = exp.clamp(min=fmt.emin)
    drop = man - fmt.man_bits + texp - exp  # significand bits below the target's spacing
    d = drop.clamp(max=62)
    keep = sig >> d
    rem = sig - (keep << d)
    frac = torch.where(drop <= 32, rem << (32 - drop).clamp(min=0), rem >> (drop - 32).clamp(0, 62))
    gen = None
    if seed is not None:
        gen = torch.Generator(device=v.device).manual_seed(seed)
    draw = torch.randint(0, 2**32, v.shape, dtype=torch.int64, generator=gen, device=v.device)
    bits = ((texp - fmt.emin) << fmt.man_bits) + keep + (draw < frac).long()
    over = fmt.overflow_bits(saturate)
    bits = torch.where(bits > fmt.max_bits, over, bits)
    bits = torch.where(a > inf, fmt.nan_bits, torch.where(a == inf, over, bits))
    bits = bits | (negative << (fmt.bits - 1))
    if fmt.bits == 16:
        bits = bits - ((bits >> 15) << 16)
    return bits.to(fmt.int_dtype).view(fmt.dtype)


def precision_cast(x: torch.Tensor, *, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool, margin: int,
                   seed: int | None) -> CastResult:
    """amax and count with reductions, scale, then round (see the module docstring)."""
    fmt = FORMATS[dtype]
    xc = x.detach().contiguous().to(compute_dtype(x.dtype))  # a cast has no gradient
    amax, nonfinite = _stats(xc)
    if scaling == "amax":
        scale = amax_scale(amax, dtype, margin)
        v = xc * scale.to(xc.dtype)
    else:
        scale = torch.ones((), dtype=torch.float32, device=x.device)
        v = xc
    y = _nearest(v, fmt, saturate) if rounding == "nearest" else _stochastic(v, fmt, saturate, seed)
    return CastResult(y=y, scale=scale, amax=amax, nonfinite=nonfinite)


# -- torch-cast: the peer where it is exact --------------------------------------------------------

CAST_SOURCES = (torch.float32, torch.bfloat16, torch.float16)
_overflow_rules: dict[tuple[str, torch.dtype, torch.dtype], bool | None] = {}


def cast_saturates(device: str, source: torch.dtype, dtype: torch.dtype) -> bool | None:
    """Whether torch's ``.to(dtype)`` from ``source`` on ``device`` follows the contract's saturate=True
    rule (True), its saturate=False rule (False), or neither (None), judged bit for bit against the
    reference on the contract's boundary values (both signs: subnormals, ties, max finite, the overflow
    threshold and around it, inf, NaN). Cast once per (device, source, target) and remembered."""
    key = (device, source, dtype)
    if key not in _overflow_rules:
        from plugins.reference.precision_cast import precision_cast as reference

        fmt = FORMATS[dtype]
        values = special_values(dtype).to(source)
        y = values.to(device).to(dtype).cpu()
        got, got_nan = _pattern(y, fmt), torch.isnan(y.double())
        rule = None
        for saturate in (False, True):
            want = reference(values, dtype=dtype, rounding="nearest", scaling="none", saturate=saturate, margin=0,
                             seed=None).y
            if bool(((got == _pattern(want, fmt)) | (got_nan & torch.isnan(want.double()))).all()):
                rule = saturate
                break
        _overflow_rules[key] = rule
    return _overflow_rules[key]


def _pattern(y: torch.Tensor, fmt: Format) -> torch.Tensor:
    return y.view(fmt.int_dtype).to(torch.int64) & ((1 << fmt.bits) - 1)


def _cast_check(x: torch.Tensor, *, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool, margin: int,
                seed: int | None) -> list[str]:
    if rounding != "nearest":
        return ["torch's cast rounds to nearest only (rounding='stochastic' needs the bit arithmetic)"]
    if x.dtype not in CAST_SOURCES:
        return [f"torch casts {x.dtype} through float32 (two roundings); the contract rounds once"]
    rule = cast_saturates(x.device.type, x.dtype, dtype)
    if rule is None:
        return [f"torch's cast from {x.dtype} to {dtype} on {x.device.type} follows neither overflow rule of the "
                f"contract"]
    if rule != saturate:
        have = "clamps to max finite" if rule else "gives inf (NaN for float8_e4m3fn)"
        return [f"torch's cast to {dtype} {have} on overflow here, and the call asks saturate={saturate}"]
    return []


def _f32(v: float) -> float:
    """v rounded to float32 (inf past its range)."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def _scale_of(amax: float, dtype: torch.dtype, margin: int) -> float:
    """The contract's float32 scale from a float32 amax, in Python floats: each float32 operation of
    the contract is one correctly rounded double operation rounded to float32, which is exact for a
    quotient of float32 numbers (double has more than 2 * 24 + 2 bits)."""
    if not (0.0 < amax < math.inf):
        return 1.0
    s = _f32(_f32(FORMATS[dtype].max_finite / amax) / float(2 ** margin))
    return FLOAT32_MAX if math.isinf(s) else s


def cast(x: torch.Tensor, *, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool, margin: int,
         seed: int | None) -> CastResult:
    """``x.to(dtype)`` (``(x * scale).to(dtype)`` with scaling='amax'), with the statistics beside it."""
    x = x.detach()
    if x.device.type != "cpu":  # no host sync: the statistics and the scale stay on the device
        amax, nonfinite = _stats(x if x.dtype == torch.float32 else x.float())
        one = torch.ones((), dtype=torch.float32, device=x.device)
        scale = amax_scale(amax, dtype, margin) if scaling == "amax" else one
        y = x.to(dtype, copy=True) if scaling == "none" else (x.float() * scale).to(dtype)
        return CastResult(y=y, scale=scale, amax=amax, nonfinite=nonfinite)
    # min and max in one pass (torch's vector_norm(x, inf) is 6x slower here); inf shows in one of
    # them and NaN in both, so two finite ends mean every element is finite
    lo, hi = (float(e) for e in torch.aminmax(x)) if x.numel() else (0.0, 0.0)
    if math.isfinite(lo) and math.isfinite(hi):
        amax_value, nonfinite = max(-lo, hi), torch.zeros((), dtype=torch.int64)
    else:
        amax_t, nonfinite = _stats(x.float())
        amax_value = float(amax_t)
    amax = torch.tensor(amax_value, dtype=torch.float32)
    if scaling == "none":
        one = torch.ones((), dtype=torch.float32)
        return CastResult(y=x.to(dtype, copy=True), scale=one, amax=amax, nonfinite=nonfinite)
    s = _scale_of(amax_value, dtype, margin)
    v = x * s if x.dtype == torch.float32 else x.float() * s  # s is a float32 number: the product is float32's
    return CastResult(y=v.to(dtype), scale=torch.tensor(s, dtype=torch.float32), amax=amax, nonfinite=nonfinite)


KERNELS = [
    Kernel(op="precision_cast", backend="torch-cast", fn=cast, devices={"cpu", "cuda"}, dtypes=set(CAST_SOURCES),
           priority=20, check=_cast_check,
           description="the peer: x.to(dtype) (or (x * scale).to(dtype)) where torch's cast is the contract's"),
    Kernel(op="precision_cast", backend="torch", fn=precision_cast, devices={"cpu", "cuda"}, dtypes=set(SOURCES),
           priority=10, description="clamp + torch's cast + explicit overflow; stochastic by integer bit arithmetic"),
]
