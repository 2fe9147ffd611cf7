"""precision_cast: fp64/fp32/bf16/fp16 to fp16, bf16 or fp8 with per-tensor scaling, stochastic rounding
and overflow detection, as mixed-precision training and fp8 inference do on every step.

``precision_cast(x, dtype=..., rounding=, scaling=, saturate=, margin=, seed=)`` returns
``CastResult(y, scale, amax, nonfinite)``:

- ``amax``: float32, the largest ``|x|`` over the finite elements (0 when there are none), rounded to
  float32 once (so a float64 amax past float32's range is inf); ``nonfinite``: int64, how many
  elements are inf or NaN.
- ``scaling="amax"``: ``scale = max_finite(dtype) / amax / 2**margin`` in float32 (Transformer Engine's
  per-tensor recipe); 1 when amax is 0 or not finite, and the float32 max where the quotient is inf.
  ``scaling="none"``: scale is 1.
- The value cast is ``v = x * scale``, computed in float64 for a float64 ``x`` and in float32 otherwise
  (as Transformer Engine does); with ``scaling="none"`` it is ``x`` itself, so a float64 input is
  rounded once, straight to ``dtype`` (no double rounding through float32).
- ``rounding="nearest"``: IEEE round to nearest, ties to even, subnormals of ``dtype`` and the sign of
  zero included. ``rounding="stochastic"``: one of the two representable neighbours of ``v``, the one
  away from zero with probability (distance from the one toward zero) / (their gap); a representable
  ``v`` is unchanged. Past the largest finite number the neighbours continue at the top binade's
  spacing, and a neighbour beyond the largest finite number overflows as below. The kernels draw 32
  random bits per element (the probability is exact to 2**-32; the reference draws float64 uniforms);
  ``seed`` makes a kernel's draws reproducible, and ``seed=None`` takes them from torch's default
  generator, so ``torch.manual_seed`` governs them.
- Overflow, ``saturate=False`` (OCP / ml_dtypes): inf where ``dtype`` has inf, NaN for float8_e4m3fn;
  ``saturate=True`` (CUDA / Transformer Engine): finite overflow and +-inf clamp to +-max finite. NaN
  stays NaN in both.

Compare rule: ``nearest`` is bit-exact in ``y`` (NaN compared as NaN, not by payload) and exact in
``scale``, ``amax`` and ``nonfinite``. ``stochastic`` is exact in the three scalars, and every element
of ``y`` must be one of the two neighbours of ``v`` (checked from the neighbours' own bit patterns, not
from a rounding routine); the probabilities are tested statistically in tests/test_precision_cast*.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import torch

from core.errors import invalid
from core.spec import (Attr, OpSpec, Sample, TensorMeta, Verdict, bucket, device_type, dtype_name, max_abs_diff,
                       require_tensor)

NAME = "precision_cast"
SOURCES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
ROUNDINGS = ("nearest", "stochastic")
SCALINGS = ("none", "amax")
REFERENCE_ELEMENTS = 1 << 19  # up to this many elements, candidates are also validated at full size
MAX_MARGIN = 127  # 2**margin must be a float32 power of two
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class CastResult(NamedTuple):
    """What precision_cast returns: the cast tensor, the scale it was cast at, amax and the non-finite count."""

    y: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor
    nonfinite: torch.Tensor


class Format(NamedTuple):
    """A binary floating-point target: sign, ``exp_bits`` exponent bits, ``man_bits`` fraction bits.

    ``ieee``: the top exponent is reserved for inf and NaN (float16, bfloat16, float8_e5m2). Otherwise
    (float8_e4m3fn, the OCP "fn" encoding) there is no inf and only the all-ones pattern is NaN.
    """

    dtype: torch.dtype
    bits: int
    exp_bits: int
    man_bits: int
    ieee: bool

    @property
    def bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (the subnormals share its spacing)."""
        return 1 - self.bias

    @property
    def max_bits(self) -> int:
        top = (1 << self.exp_bits) - 1
        if self.ieee:
            return ((top - 1) << self.man_bits) | ((1 << self.man_bits) - 1)
        return (top << self.man_bits) | ((1 << self.man_bits) - 2)

    @property
    def max_finite(self) -> float:
        exp = (self.max_bits >> self.man_bits) - self.bias
        frac = self.max_bits & ((1 << self.man_bits) - 1)
        return math.ldexp(1.0 + frac / (1 << self.man_bits), exp)

    @property
    def top_spacing(self) -> float:
        """The spacing of the largest binade: the gap between max finite and the next value up."""
        return math.ldexp(1.0, (self.max_bits >> self.man_bits) - self.bias - self.man_bits)

    @property
    def inf_bits(self) -> int | None:
        return (((1 << self.exp_bits) - 1) << self.man_bits) if self.ieee else None

    @property
    def nan_bits(self) -> int:
        if self.ieee:
            return (((1 << self.exp_bits) - 1) << self.man_bits) | (1 << (self.man_bits - 1))
        return (1 << (self.bits - 1)) - 1

    def overflow_bits(self, saturate: bool) -> int:
        """The magnitude bits of a finite value that rounds beyond max finite, and of +-inf."""
        if saturate:
            return self.max_bits
        return self.inf_bits if self.inf_bits is not None else self.nan_bits

    @property
    def int_dtype(self) -> torch.dtype:
        """The integer dtype a tensor of this format is viewed as to read its bit patterns."""
        return torch.uint8 if self.bits == 8 else torch.int16


FORMATS: dict[torch.dtype, Format] = {
    torch.float16: Format(dtype=torch.float16, bits=16, exp_bits=5, man_bits=10, ieee=True),
    torch.bfloat16: Format(dtype=torch.bfloat16, bits=16, exp_bits=8, man_bits=7, ieee=True),
    torch.float8_e4m3fn: Format(dtype=torch.float8_e4m3fn, bits=8, exp_bits=4, man_bits=3, ieee=False),
    torch.float8_e5m2: Format(dtype=torch.float8_e5m2, bits=8, exp_bits=5, man_bits=2, ieee=True),
}
TARGETS = tuple(FORMATS)


def compute_dtype(source: torch.dtype) -> torch.dtype:
    """The precision ``x * scale`` is computed in: float64 for a float64 x, float32 otherwise."""
    return torch.float64 if source == torch.float64 else torch.float32


def amax_scale(amax: torch.Tensor, dtype: torch.dtype, margin: int) -> torch.Tensor:
    """The contract's scale for a float32 amax tensor, in float32 on amax's device (no host sync)."""
    s = torch.full((), FORMATS[dtype].max_finite, dtype=torch.float32, device=amax.device) / amax
    s = s / float(2 ** margin)
    s = torch.where(torch.isinf(s), torch.full_like(s, FLOAT32_MAX), s)
    usable = (amax > 0) & torch.isfinite(amax)
    return torch.where(usable, s, torch.ones_like(s))


def scaled_values(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``v = x * scale`` exactly as the contract computes it, returned in float64 on the CPU."""
    x = x.detach().cpu()
    if x.dtype == torch.float64:
        return x * scale.detach().cpu().double()
    return (x.float() * scale.detach().cpu().float()).double()


# -- verify, key, infer ------------------------------------------------------------------------------

def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(f"torch.{dtype_name(d)}" for d in dtypes)


_ACCEPTED: set[tuple[Any, ...]] = set()  # (dtype, rounding, scaling, margin) the rules have accepted
_SOURCE_SET = frozenset(SOURCES)
_STRIDED = torch.strided


def _verify(args: tuple[Any, ...], attrs: dict[str, Any]) -> tuple[Any, ...] | None:
    """The rules, then the dispatch key (``_key``'s tuple) from what was read here. Attributes the rules
    accepted once are recognised by one set lookup (a small cast's call is mostly such steps); exact
    types are asked first, since True == 1 would otherwise pass for a margin or 1 for saturate."""
    (x,) = args
    dtype, saturate, margin = attrs["dtype"], attrs["saturate"], attrs["margin"]
    try:
        seen = (isinstance(x, torch.Tensor) and x.layout is _STRIDED and x.dtype in _SOURCE_SET
                and saturate.__class__ is bool
                and margin.__class__ is int and attrs["seed"] is None
                and (dtype, attrs["rounding"], attrs["scaling"], margin) in _ACCEPTED)
    except TypeError:  # an unhashable attribute: the rules below name it
        seen = False
    if not seen:
        _check_rules(x, attrs)
    try:
        n = x.numel()
        return (device_type(x), _DTYPE_STR[x.dtype], _DTYPE_STR[dtype], attrs["rounding"], attrs["scaling"],
                saturate, x.is_contiguous(), n if n <= 1 else 1 << (n - 1).bit_length())
    except (AttributeError, TypeError):  # symbolic sizes while tracing: the caller falls back to _key
        return None


def _fast_key(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """What ``_verify`` and ``_key`` read, in one tuple: the input's class, dtype, device, layout and size
    bucket, and each attribute with its exact type. None for a seeded call (a key per seed would pile
    up) and for anything that is not a tensor."""
    if attrs["seed"] is not None:
        return None
    (x,) = args
    saturate, margin = attrs["saturate"], attrs["margin"]
    try:
        if x.layout is not _STRIDED:  # verify's rules name it
            return None
        n = x.numel()
        return (x.__class__, x.dtype, x.device, x.is_contiguous(), n if n <= 1 else 1 << (n - 1).bit_length(),
                attrs["dtype"], attrs["rounding"], attrs["scaling"], saturate.__class__, saturate, margin.__class__,
                margin)
    except (AttributeError, TypeError):  # not a tensor, or symbolic sizes
        return None


def _check_rules(x: Any, attrs: Mapping[str, Any]) -> None:
    """Every rule, naming the first broken one; remembers attributes that pass (without a seed)."""
    require_tensor(NAME, "x", x)
    if x.dtype not in SOURCES:
        raise invalid(NAME, "x", f"a floating tensor of dtype {_names(SOURCES)}", f"dtype {x.dtype}")
    dtype = attrs["dtype"]
    if not isinstance(dtype, torch.dtype) or dtype not in FORMATS:
        raise invalid(NAME, "dtype", f"one of {_names(TARGETS)}", repr(dtype))
    if attrs["rounding"] not in ROUNDINGS:
        raise invalid(NAME, "rounding", f"one of {list(ROUNDINGS)}", repr(attrs["rounding"]))
    if attrs["scaling"] not in SCALINGS:
        raise invalid(NAME, "scaling", f"one of {list(SCALINGS)}", repr(attrs["scaling"]))
    if not isinstance(attrs["saturate"], bool):
        raise invalid(NAME, "saturate", "a bool", repr(attrs["saturate"]))
    margin = attrs["margin"]
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= MAX_MARGIN:
        raise invalid(NAME, "margin", f"an int in [0, {MAX_MARGIN}] (2**margin must be a float32 power of two)",
                      repr(margin))
    seed = attrs["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise invalid(NAME, "seed", "None or an int in [0, 2**63)", repr(seed))
    if seed is None and margin.__class__ is int and attrs["saturate"].__class__ is bool:
        _ACCEPTED.add((dtype, attrs["rounding"], attrs["scaling"], margin))


_DTYPE_STR = {d: str(d) for d in (*SOURCES, *FORMATS)}  # str(torch.dtype) costs a fraction of a microsecond


def _key(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[Any, ...]:
    (x,) = args
    return (device_type(x), _DTYPE_STR[x.dtype], _DTYPE_STR[attrs["dtype"]], attrs["rounding"], attrs["scaling"],
            attrs["saturate"], x.is_contiguous(), bucket(x.numel()))


def _device(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> str:
    return args[0].device.type


def _dtypes(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[torch.dtype, ...]:
    return (args[0].dtype,)


def _infer(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> Any:
    scalar = TensorMeta(shape=(), dtype=torch.float32)
    return CastResult(y=TensorMeta(shape=tuple(args[0].shape), dtype=attrs["dtype"]), scale=scalar, amax=scalar,
                      nonfinite=TensorMeta(shape=(), dtype=torch.int64))


# -- samples -----------------------------------------------------------------------------------------

def _from_bits(bits: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The float64 values of ``fmt`` bit patterns given as non-negative int64 (sign bit included)."""
    wide = torch.where(bits >= 1 << (fmt.bits - 1), bits - (1 << fmt.bits), bits) if fmt.bits == 16 else bits
    return wide.to(fmt.int_dtype).view(fmt.dtype).double()


def mixed_values(gen: torch.Generator, n: int, dtype: torch.dtype, *, overflow_band: bool = True) -> torch.Tensor:
    """Float64 values that exercise every path of a cast to ``dtype``: representable values, exact ties
    between neighbours, log-uniform magnitudes from below the smallest subnormal to past the overflow
    threshold, signed zeros, +-inf and NaN; random signs. ``overflow_band=False`` keeps out the values
    between max finite and the next value up (where stochastic rounding may or may not overflow)."""
    fmt = FORMATS[dtype]
    pick = torch.randint(0, 4, (n,), generator=gen)
    p = torch.randint(0, fmt.max_bits, (n,), generator=gen)
    exact = _from_bits(p, fmt)
    upper = torch.where(p + 1 <= fmt.max_bits, _from_bits((p + 1).clamp(max=fmt.max_bits), fmt),
                        torch.full_like(exact, fmt.max_finite + fmt.top_spacing))
    ties = (exact + upper) / 2
    lo_exp = fmt.emin - fmt.man_bits - 3
    hi_exp = (fmt.max_bits >> fmt.man_bits) - fmt.bias + 2
    exps = torch.randint(lo_exp, hi_exp, (n,), generator=gen).double()
    spread = (1 + torch.rand(n, generator=gen, dtype=torch.float64)) * torch.exp2(exps)
    specials = torch.tensor([0.0, math.inf, math.nan, fmt.max_finite, fmt.max_finite + fmt.top_spacing / 2],
                            dtype=torch.float64)
    special = specials[torch.randint(0, len(specials), (n,), generator=gen)]
    v = torch.where(pick == 0, exact, torch.where(pick == 1, ties, torch.where(pick == 2, spread, special)))
    if not overflow_band:
        band = (v > fmt.max_finite) & (v < fmt.max_finite + fmt.top_spacing)
        v = torch.where(band, torch.full_like(v, fmt.max_finite), v)
    sign = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return v * sign


def _values(gen: torch.Generator, n: int, source: torch.dtype, attrs: Mapping[str, Any]) -> torch.Tensor:
    """Sample values in the source dtype. With scaling="amax" they are spread over 2**+-20 and the
    largest finite magnitude is made a power of two, so ``amax * scale`` is exactly max finite and no
    element lands past it through the rounding of the scale itself."""
    dtype = attrs["dtype"]
    band = not (attrs["rounding"] == "stochastic" and not attrs["saturate"] and not FORMATS[dtype].ieee)
    v = mixed_values(gen, n, dtype, overflow_band=band)
    if attrs["scaling"] != "amax" or n == 0:
        return v.to(source)
    x = (v * 2.0 ** int(torch.randint(-20, 21, (), generator=gen))).to(source).double()
    finite = torch.isfinite(x)
    top = float(torch.where(finite, x.abs(), 0).max())
    if top > 0:
        p = 2.0 ** math.floor(math.log2(top))
        x = torch.where(finite, x.clamp(-p, p), x)
        x[int(torch.where(finite, x.abs(), 0).argmax())] = p
    return x.to(source)


def _layout(values: torch.Tensor, shape: tuple[int, ...], contiguous: bool) -> torch.Tensor:
    """``values`` in ``shape``; when not ``contiguous``, every other element of a wider buffer."""
    if contiguous or values.numel() == 0:
        return values.reshape(shape)
    wide = torch.zeros(2 * values.numel(), dtype=values.dtype)
    wide[::2] = values
    return wide[::2].reshape(shape) if len(shape) <= 1 else wide.reshape(*shape[:-1], 2 * shape[-1])[..., ::2]


def _sample(gen: torch.Generator, device: str, source: torch.dtype, shape: tuple[int, ...], contiguous: bool,
            attrs: Mapping[str, Any], name: str = "") -> Sample:
    n = math.prod(shape)
    x = _layout(_values(gen, n, source, attrs), shape, contiguous)
    if not contiguous and x.is_contiguous() and n > 1:
        x = _layout(_values(gen, n, source, attrs), (n,), False)
    return Sample(args=(x.to(device),), attrs=dict(attrs), name=name)


def _shrink(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator) -> Sample:
    (x,) = args
    n = min(x.numel(), 4096)
    shape = (n,) if x.dim() != 0 else ()
    return _sample(gen, x.device.type, x.dtype, shape, x.is_contiguous(), attrs)


def _fits_reference(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> bool:
    """The numpy reference rounds 2**19 elements in about 0.1 s."""
    return args[0].numel() <= REFERENCE_ELEMENTS


def _synthesize(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator) -> Sample:
    """Typical data (standard normal) in the caller's shape, dtype, device and layout."""
    (x,) = args
    n = x.numel()
    values = torch.randn(n, generator=gen, dtype=torch.float32).to(x.dtype)
    shape = tuple(x.shape)
    if x.is_contiguous():
        y = values.reshape(shape)
    else:
        size = 1 + sum((s - 1) * st for s, st in zip(shape, x.stride())) if n else 0
        storage = torch.randn(size, generator=gen, dtype=torch.float32).to(x.dtype)
        y = storage.as_strided(shape, x.stride())
    return Sample(args=(y.to(x.device),), attrs=dict(attrs))


def _attrs(dtype: torch.dtype, rounding: str = "nearest", scaling: str = "none", saturate: bool = False,
           margin: int = 0, seed: int | None = None) -> dict[str, Any]:
    return {"dtype": dtype, "rounding": rounding, "scaling": scaling, "saturate": saturate, "margin": margin,
            "seed": seed}


def _case(shape: tuple[int, ...], source: torch.dtype, dtype: torch.dtype, *, contiguous: bool = True,
          values: Any = None, **kw: Any) -> Any:
    attrs = _attrs(dtype, **kw)

    def make(gen: torch.Generator, device: str) -> Sample:
        if values is None:
            return _sample(gen, device, source, shape, contiguous, attrs)
        x = values(gen).to(source)
        return Sample(args=(_layout(x, tuple(x.shape), contiguous).to(device),), attrs=dict(attrs))
    return make


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Float64 values at every boundary of a cast to ``dtype``, both signs: zeros, the smallest subnormal,
    half of it and just past half, the smallest normal and its neighbours, max finite and the values
    just below, at and above the overflow threshold, +-inf, NaN, and float32 subnormals."""
    fmt = FORMATS[dtype]
    tiny = math.ldexp(1.0, fmt.emin - fmt.man_bits)
    small = math.ldexp(1.0, fmt.emin)
    mx, top = fmt.max_finite, fmt.top_spacing
    ulp32 = lambda v: math.ldexp(1.0, math.frexp(v)[1] - 24)  # noqa: E731 (the float32 spacing at v)
    edge = [0.0, tiny, tiny / 2, tiny / 2 * (1 + 2**-20), tiny * 1.5, tiny * 2.5, tiny / 4, small, small - tiny,
            small - tiny / 2, small + tiny / 2, mx, mx - top / 4, mx - top / 2, mx + top / 4, mx + top / 2,
            mx + top / 2 - ulp32(mx), mx + top / 2 + ulp32(mx), mx + top, 2 * mx, 1.0, 1.0 + 2.0 ** -fmt.man_bits / 2,
            1.0 + 3 * 2.0 ** -fmt.man_bits / 2, math.ldexp(1.0, -149), math.ldexp(1.0, -130), FLOAT32_MAX,
            math.inf, math.nan]
    v = torch.tensor(edge, dtype=torch.float64)
    return torch.cat([v, -v])


EDGE_CASES = {
    **{f"specials-{dtype_name(d)}": _case((), torch.float32, d, values=lambda g, d=d: special_values(d))
       for d in TARGETS},
    **{f"specials-{dtype_name(d)}-saturate": _case((), torch.float32, d, saturate=True,
                                                     values=lambda g, d=d: special_values(d)) for d in TARGETS},
    "float64-to-bfloat16": _case((777,), torch.float64, torch.bfloat16),
    "float64-to-e4m3fn-saturate": _case((777,), torch.float64, torch.float8_e4m3fn, saturate=True),
    "float16-to-e5m2": _case((33, 17), torch.float16, torch.float8_e5m2),
    "bfloat16-to-float16": _case((501,), torch.bfloat16, torch.float16),
    "empty": _case((0, 5), torch.float32, torch.float8_e4m3fn, scaling="amax"),
    "scalar": _case((), torch.float32, torch.float16),
    "non-contiguous": _case((19, 23), torch.float32, torch.bfloat16, contiguous=False),
    "amax-e4m3fn-margin2": _case((1000,), torch.float32, torch.float8_e4m3fn, scaling="amax", margin=2),
    "amax-all-nonfinite": _case((), torch.float32, torch.float8_e5m2, scaling="amax",
                                values=lambda g: torch.tensor([math.inf, -math.inf, math.nan] * 3)),
    "amax-subnormal": _case((), torch.float32, torch.float16, scaling="amax",
                            values=lambda g: torch.tensor([2.0 ** -149, -(2.0 ** -148), 0.0, math.nan])),
    "amax-float64-beyond-float32": _case((), torch.float64, torch.bfloat16, scaling="amax",
                                         values=lambda g: torch.tensor([1e300, -3.0, 2.5e-300, 0.0])),
    "stochastic-e4m3fn": _case((2048,), torch.float32, torch.float8_e4m3fn, rounding="stochastic"),
    "stochastic-e5m2-saturate": _case((2048,), torch.float32, torch.float8_e5m2, rounding="stochastic",
                                      saturate=True),
    "stochastic-float64-to-float16": _case((2048,), torch.float64, torch.float16, rounding="stochastic", seed=7),
    "stochastic-bfloat16-amax": _case((1024,), torch.bfloat16, torch.float8_e4m3fn, rounding="stochastic",
                                      scaling="amax", saturate=True),
    "stochastic-non-contiguous": _case((40, 30), torch.float16, torch.bfloat16, rounding="stochastic",
                                       contiguous=False),
}

_N = 1 << 18
CASES = {
    "f32-to-bf16": _case((_N,), torch.float32, torch.bfloat16),
    "f32-to-f16": _case((_N,), torch.float32, torch.float16),
    "f32-to-e4m3fn-amax-saturate": _case((_N,), torch.float32, torch.float8_e4m3fn, scaling="amax", saturate=True),
    "f32-to-e5m2-amax": _case((_N,), torch.float32, torch.float8_e5m2, scaling="amax"),
    "bf16-to-e4m3fn-stochastic": _case((_N,), torch.bfloat16, torch.float8_e4m3fn, rounding="stochastic",
                                       scaling="amax", saturate=True),
    "f32-to-bf16-stochastic": _case((_N,), torch.float32, torch.bfloat16, rounding="stochastic"),
}


# -- compare rule ------------------------------------------------------------------------------------

def _bits(y: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The bit patterns of ``y`` as non-negative int64."""
    b = y.detach().cpu().contiguous().view(fmt.int_dtype).to(torch.int64)
    return b & ((1 << fmt.bits) - 1)


def neighbour_problem(y: torch.Tensor, v: torch.Tensor, fmt: Format, saturate: bool) -> tuple[int, str]:
    """How many elements of ``y`` are not one of the two neighbours of ``v`` (float64), and one example.

    A finite ``y`` is a neighbour when it has ``v``'s sign and no representable number lies strictly
    between it and ``v``: the next pattern up (past max finite: max + the top spacing, or inf when
    saturating) is above ``|v|``, or the next pattern down is below it. An overflow result (inf, NaN for
    e4m3fn, max when saturating) is allowed exactly when ``|v|`` is past max finite.
    """
    bits = _bits(y, fmt).reshape(-1)
    v = v.reshape(-1)
    sign_mask = 1 << (fmt.bits - 1)
    mag = bits & (sign_mask - 1)
    y_neg = (bits & sign_mask) != 0
    a = v.abs()
    over = a > fmt.max_finite  # includes inf
    ovf = fmt.overflow_bits(saturate)
    finite_y = mag <= fmt.max_bits
    up_val = torch.where(mag < fmt.max_bits, _from_bits((mag + 1).clamp(max=fmt.max_bits), fmt),
                         torch.full_like(a, math.inf if saturate else fmt.max_finite + fmt.top_spacing))
    down_val = torch.where(mag > 0, _from_bits((mag - 1).clamp(min=0), fmt), torch.full_like(a, -1.0))
    y_abs = _from_bits(mag, fmt)
    between = (y_abs == a) | ((y_abs < a) & (a < up_val)) | ((down_val < a) & (a < y_abs))
    ok_finite = finite_y & (y_neg == torch.signbit(v)) & between
    ok_overflow = over & (mag == ovf) & (y_neg == torch.signbit(v) if fmt.ieee or saturate else True)
    is_nan_y = (mag > fmt.max_bits) & (mag != (fmt.inf_bits if fmt.inf_bits is not None else -1))
    ok_nan = torch.isnan(v) & is_nan_y
    ok = torch.where(torch.isnan(v), ok_nan, ok_finite | ok_overflow)
    bad = (~ok).nonzero()
    if bad.numel() == 0:
        return 0, ""
    i = int(bad[0, 0])
    return int(bad.numel()), (f"element {i}: v={float(v[i])!r} gave bits {int(bits[i]):#x} "
                              f"({float(_from_bits(bits[i:i + 1], fmt)[0])!r}), not a neighbour")


def _compare(out: Any, ref: Any, sample: Sample) -> Verdict:
    attrs = sample.attrs
    fmt = FORMATS[attrs["dtype"]]
    for field in ("scale", "amax", "nonfinite"):
        got, want = getattr(out, field).detach().cpu(), getattr(ref, field).detach().cpu()
        if not bool((got == want).all()):
            err = abs(float(got.double()) - float(want.double()))
            return Verdict(ok=False, max_error=err if err == err else math.inf,
                           reason=f"{field} is {float(got)!r}, the reference's is {float(want)!r} (must be exact)")
    if attrs["rounding"] == "nearest":
        got, want = _bits(out.y, fmt), _bits(ref.y, fmt)
        same = (got == want) | (torch.isnan(out.y.detach().cpu().double()) & torch.isnan(ref.y.detach().cpu().double()))
        if not bool(same.all()):
            wrong = (~same).nonzero()
            i = tuple(int(j) for j in wrong[0])
            return Verdict(ok=False, max_error=max_abs_diff(out.y, ref.y),
                           reason=f"{wrong.shape[0]} elements differ in their bits from the reference; first at "
                                  f"{i}: {int(got[i]):#x} instead of {int(want[i]):#x}")
        return Verdict(ok=True, max_error=0.0)
    v = scaled_values(sample.args[0], ref.scale)
    count, example = neighbour_problem(out.y, v, fmt, attrs["saturate"])
    if count:
        return Verdict(ok=False, max_error=max_abs_diff(out.y, ref.y),
                       reason=f"stochastic rounding: {count} elements are not a neighbour of x * scale; {example}")
    # The reported error is relative (|y - v| / |v|, at most one spacing of the format): an absolute
    # one would be dominated by the largest magnitudes and say nothing about the rounding.
    y = out.y.detach().cpu().double().reshape(-1)
    v = v.reshape(-1)
    both = torch.isfinite(y) & torch.isfinite(v) & (v != 0)
    err = float(((y - v).abs() / v.abs())[both].max()) if bool(both.any()) else 0.0
    return Verdict(ok=True, max_error=err)


SPEC = OpSpec(
    name=NAME,
    summary="Cast float64/32/16 to float16, bfloat16 or float8 with per-tensor scaling, stochastic rounding "
            "and overflow detection",
    inputs=("x",),
    attrs=(
        Attr(name="dtype", doc="the target: float16, bfloat16, float8_e4m3fn or float8_e5m2"),
        Attr(name="rounding", default="nearest", doc="'nearest' (ties to even) or 'stochastic' (unbiased)"),
        Attr(name="scaling", default="none", doc="'none' (scale 1) or 'amax' (max_finite / amax / 2**margin)"),
        Attr(name="saturate", default=False, doc="clamp overflow and +-inf to +-max finite instead of inf/NaN"),
        Attr(name="margin", default=0, doc="scaling='amax' leaves 2**margin of headroom"),
        Attr(name="seed", default=None, doc="makes stochastic rounding reproducible for a given kernel"),
    ),
    verify=_verify,
    key=_key,
    fast_key=_fast_key,
    key_sizes=(7,),
    device=_device,
    dtypes=_dtypes,
    infer=_infer,
    shrink=_shrink,
    synthesize=_synthesize,
    fits_reference=_fits_reference,
    compare=_compare,
    cases=CASES,
    edge_cases=EDGE_CASES,
    compare_checks_nan=True,  # stochastic overflow may be NaN (e4m3fn) in one valid rounding, finite in another
)
