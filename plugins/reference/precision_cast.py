"""Reference precision_cast: numpy, rounding from the value's own exponent and bits, no narrowing cast.

Every value to cast is an exact float64 ``v`` (x upcast exactly, times the scale in the contract's
precision). Rounding to a target with ``m`` fraction bits and smallest normal exponent ``emin``: the
target's spacing at ``v`` is ``2**(max(e, emin) - m)`` where ``2**e <= |v| < 2**(e+1)``; ``|v| / spacing``
splits exactly into an integer ``k`` and a fraction ``r`` in [0, 1); the result is ``k`` or ``k + 1``
spacings (nearest: ``r > 1/2``, or ``r == 1/2`` and ``k`` odd; stochastic: a uniform draw below
``r``). The target's bit pattern is then ``(max(e, emin) - emin) << m`` plus that count, which is the
IEEE layout for normals and subnormals alike, including a carry into the next binade.
"""
from __future__ import annotations

import numpy as np
import torch

from core.ops.precision_cast import FORMATS, CastResult, Format
from registry import Kernel


def _round(v: np.ndarray, fmt: Format, saturate: bool, u: np.ndarray | None) -> np.ndarray:
    """Bit patterns (int64) of ``v`` (float64) rounded to ``fmt``; ``u`` uniform draws for stochastic."""
    sign = np.signbit(v)
    a = np.abs(v)
    finite = np.isfinite(a)
    # from 2 * max finite up both neighbours are past max finite; keep the arithmetic away from huge values
    beyond = ~finite | (a >= 2.0 * fmt.max_finite)
    a = np.where(beyond, 0.0, a)
    _, e = np.frexp(a)  # a = f * 2**e with f in [0.5, 1), so 2**(e-1) <= a < 2**e
    exp = np.where(a > 0, np.maximum(e - 1, fmt.emin), fmt.emin)
    spacing = np.ldexp(1.0, exp - fmt.man_bits)
    q = a / spacing  # exact: a power-of-two scaling
    k = np.floor(q)
    r = q - k
    if u is None:
        up = (r > 0.5) | ((r == 0.5) & (np.fmod(k, 2) == 1))
    else:
        up = u < r
    count = k.astype(np.int64) + up
    bits = ((exp - fmt.emin).astype(np.int64) << fmt.man_bits) + count
    overflow = fmt.overflow_bits(saturate)
    bits = np.where(beyond | (bits > fmt.max_bits), overflow, bits)
    bits = np.where(np.isnan(v), fmt.nan_bits, bits)
    return bits | (sign.astype(np.int64) << (fmt.bits - 1))


def _scale(amax: np.float32, fmt: Format, margin: int) -> np.float32:
    if not (np.isfinite(amax) and amax > 0):
        return np.float32(1.0)
    with np.errstate(over="ignore", divide="ignore"):
        s = np.float32(fmt.max_finite) / amax / np.float32(2.0 ** margin)
    return s if np.isfinite(s) else np.finfo(np.float32).max


def _seed(seed: int | None) -> int:
    return int(torch.randint(0, 2**62, (), dtype=torch.int64)) if seed is None else seed


def precision_cast(x: torch.Tensor, *, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool, margin: int,
                   seed: int | None) -> CastResult:
    """Scale, round and encode in float64 numpy, as the contract words it."""
    fmt = FORMATS[dtype]
    x64 = x.detach().cpu().to(torch.float64).numpy().reshape(-1)  # exact for every source dtype
    finite = np.isfinite(x64)
    with np.errstate(over="ignore"):  # a float64 amax past float32's range becomes inf, as it should
        amax = np.float32(np.abs(x64[finite]).max()) if finite.any() else np.float32(0.0)
    scale = _scale(amax, fmt, margin) if scaling == "amax" else np.float32(1.0)
    if x.dtype == torch.float64:
        v = x64 * np.float64(scale)
    else:
        v = (x64.astype(np.float32) * scale).astype(np.float64)
    u = np.random.default_rng(_seed(seed)).random(v.shape) if rounding == "stochastic" else None
    with np.errstate(invalid="ignore", over="ignore"):
        bits = _round(v, fmt, saturate, u)
    if fmt.bits == 16:
        bits = np.where(bits >= 1 << 15, bits - (1 << 16), bits)
    raw = torch.from_numpy(bits.astype(np.uint8 if fmt.bits == 8 else np.int16)).reshape(x.shape)
    y = raw.view(dtype).to(x.device)
    return CastResult(y=y,
                      scale=torch.tensor(float(scale), dtype=torch.float32, device=x.device),
                      amax=torch.tensor(float(amax), dtype=torch.float32, device=x.device),
                      nonfinite=torch.tensor(int((~finite).sum()), dtype=torch.int64, device=x.device))


KERNELS = [
    Kernel(op="precision_cast", backend="reference", fn=precision_cast, devices={"cpu", "cuda"}, priority=-100,
           description="float64 numpy: spacing from the exponent, round the count of spacings, encode the bits"),
]
