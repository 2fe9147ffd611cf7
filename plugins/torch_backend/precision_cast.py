"""precision_cast in torch ops, CPU and CUDA, with the contract's overflow rules on any torch version.

Nearest: values are clamped to +-max finite before torch's own cast, so the cast never overflows and
only its round-to-nearest-even is relied on (torch's overflow behaviour for float8 changed between
releases); overflow is then written in from the comparison with the threshold. A float64 value is
first narrowed to float32 with round-to-odd, which makes the second rounding exact (Boldo and
Melquiond, "When double rounding is odd", 2005: it needs two more bits, float32 has 13 or more).

Stochastic: integer arithmetic on the value's bits: the significand is split at the target's spacing
into the kept count and the remainder, and the count goes up when a uniform 32-bit draw is below the
remainder as a 32-bit fraction of the spacing.
"""
from __future__ import annotations

import torch

from core.ops.precision_cast import FORMATS, SOURCES, CastResult, Format, amax_scale, compute_dtype
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


KERNELS = [
    Kernel(op="precision_cast", backend="torch", fn=precision_cast, devices={"cpu", "cuda"}, dtypes=set(SOURCES),
           priority=10, description="clamp + torch's cast + explicit overflow; stochastic by integer bit arithmetic"),
]
