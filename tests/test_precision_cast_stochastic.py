"""Stochastic rounding's statistics, for every kernel: 12,000 draws per value of where each value goes.

For values with a known lower neighbour ``lo``, upper neighbour ``hi`` and ``p = (v - lo) / (hi - lo)``
(normal range, the target's subnormals, below its smallest subnormal, just under a power of two, past
max finite, and exact values), each kernel must give only ``lo`` or ``hi``, go up with a frequency
within 5 standard errors of ``p``, average to ``v`` within 5 standard errors, and draw independently
from element to element. A kernel that rounds to nearest, reverses the probability, uses the wrong
spacing for subnormals, or reuses one draw for many elements fails these bounds.
"""
from __future__ import annotations

import math

import pytest
import torch

import plugins.fused.triton.precision_cast as triton_module
from core.ops.precision_cast import FORMATS, TARGETS
from plugins.fused import _build
from plugins.fused.precision_cast import precision_cast_cpu as fused_kernel
from plugins.reference.precision_cast import precision_cast as reference
from plugins.torch_backend.precision_cast import precision_cast as torch_kernel

DRAWS = 12_000
NAMES = {d: str(d).removeprefix("torch.") for d in TARGETS}


def triton_kernel(x, *, seed=None, **attrs):
    return triton_module.precision_cast(x, seed=0 if seed is None else seed, **attrs)


KERNELS = {"reference": reference, "torch": torch_kernel, "fused": fused_kernel, "triton": triton_kernel}


@pytest.fixture
def run(request, monkeypatch):
    name = request.param
    if name == "fused" and _build.unavailable_reason("precision_cast"):
        pytest.skip(f"fused C++ kernel unavailable here: {_build.unavailable_reason('precision_cast')}")
    if name == "triton":  # few, large programs keep the interpreter quick
        monkeypatch.setattr(triton_module, "INTERPRET_BLOCK", 1 << 15)
    return KERNELS[name]


def _value(pattern: int, dtype) -> float:
    fmt = FORMATS[dtype]
    return float(torch.tensor([pattern], dtype=fmt.int_dtype).view(dtype).double())


def cases(dtype):
    """(v, lo, hi) with v exactly a float32; hi is None past max finite (it overflows)."""
    fmt = FORMATS[dtype]
    tiny = math.ldexp(1.0, fmt.emin - fmt.man_bits)
    one = fmt.bias << fmt.man_bits  # the pattern of 1.0: biased exponent = bias, fraction 0
    assert _value(one, dtype) == 1.0
    below_two = _value(one + (1 << fmt.man_bits) - 1, dtype)  # the largest value under 2
    out = []
    for f in (0.1, 0.3, 0.5, 0.85):
        lo, hi = _value(one + 1, dtype), _value(one + 2, dtype)
        out.append((lo + f * (hi - lo), lo, hi))
    out.append((3.7 * tiny, 3 * tiny, 4 * tiny))  # the target's subnormals
    out.append((0.3 * tiny, 0.0, tiny))  # below the smallest subnormal
    out.append((below_two + 0.6 * (2.0 - below_two), below_two, 2.0))  # up into the next binade
    out.append((fmt.max_finite + 0.4 * fmt.top_spacing, fmt.max_finite, None))  # past max finite
    out.append((_value(one + 5, dtype), _value(one + 5, dtype), _value(one + 5, dtype)))  # exact
    return [(float(torch.tensor(v, dtype=torch.float32)), lo, hi) for v, lo, hi in out]


def _attrs(dtype, seed):
    return {"dtype": dtype, "rounding": "stochastic", "scaling": "none", "saturate": False, "margin": 0,
            "seed": seed}


@pytest.mark.parametrize("run", list(KERNELS), indirect=True)
@pytest.mark.parametrize("dtype", TARGETS, ids=NAMES.get)
def test_probabilities_and_unbiasedness(run, dtype):
    rows = cases(dtype)
    values = torch.tensor([s * v for v, _, _ in rows for s in (1.0, -1.0)], dtype=torch.float64)
    x = values.repeat_interleave(DRAWS).float()
    y = run(x, **_attrs(dtype, seed=2024)).y.double().reshape(-1, DRAWS)
    for k, (v, lo, hi) in enumerate(rows):
        for sign, got in ((1.0, y[2 * k]), (-1.0, y[2 * k + 1])):
            where = f"{NAMES[dtype]} v={sign * v!r}"
            mag = got.abs()
            assert bool((torch.signbit(got) == (sign < 0)).all()), where
            if hi is None:  # past max finite: max finite or the overflow result
                overflow = torch.isnan(got) if not FORMATS[dtype].ieee else torch.isinf(got)
                up = overflow
                assert bool((overflow | (mag == lo)).all()), where
                p = (v - lo) / FORMATS[dtype].top_spacing
            else:
                assert bool(((mag == lo) | (mag == hi)).all()), f"{where}: not a neighbour"
                up = (mag == hi) & (mag != lo)  # an exact value never moves
                p = 0.0 if hi == lo else (v - lo) / (hi - lo)
            freq = float(up.double().mean())
            se = math.sqrt(p * (1 - p) / DRAWS)
            assert abs(freq - p) <= 5 * se + 1e-12, f"{where}: up {freq:.4f} of the time, expected {p:.4f}"
            if hi is not None and hi != lo:
                mean = float(mag.mean())
                assert abs(mean - v) <= 5 * se * (hi - lo) + 1e-300, f"{where}: mean {mean!r}"
                upf = up.double()
                a, b = upf[:-1] - upf[:-1].mean(), upf[1:] - upf[1:].mean()
                corr = float((a * b).mean() / (a.std() * b.std()))
                assert abs(corr) < 0.05, f"{where}: neighbouring draws correlate ({corr:.3f})"


@pytest.mark.parametrize("run", list(KERNELS), indirect=True)
def test_float64_source_probabilities(run):
    """The float64 path: a value 0.3 of the way between neighbours, with bits float32 does not have."""
    dtype = torch.float16
    lo, hi = 1.0, 1.0 + 2.0 ** -10
    v = lo + (0.3 + 2.0 ** -35) * (hi - lo)
    x = torch.full((DRAWS,), v, dtype=torch.float64)
    y = run(x, **_attrs(dtype, seed=77)).y.double()
    assert bool(((y == lo) | (y == hi)).all())
    freq = float((y == hi).double().mean())
    assert abs(freq - 0.3) <= 5 * math.sqrt(0.3 * 0.7 / DRAWS)


@pytest.mark.parametrize("run", list(KERNELS), indirect=True)
def test_seeds(run, gen):
    x = torch.randn(20_000, generator=gen) * 3
    a = run(x, **_attrs(torch.float8_e4m3fn, seed=11)).y.view(torch.uint8)
    b = run(x, **_attrs(torch.float8_e4m3fn, seed=11)).y.view(torch.uint8)
    c = run(x, **_attrs(torch.float8_e4m3fn, seed=12)).y.view(torch.uint8)
    assert torch.equal(a, b), "the same seed must give the same result"
    assert int((a != c).sum()) > 100, "another seed must give other draws"


@pytest.mark.parametrize("run", ["reference", "torch", "fused"], indirect=True)
def test_no_seed_follows_torch_manual_seed(run, gen):
    x = torch.randn(5000, generator=gen)
    torch.manual_seed(5)
    a = run(x, **_attrs(torch.bfloat16, seed=None)).y.view(torch.int16)
    torch.manual_seed(5)
    b = run(x, **_attrs(torch.bfloat16, seed=None)).y.view(torch.int16)
    c = run(x, **_attrs(torch.bfloat16, seed=None)).y.view(torch.int16)
    assert torch.equal(a, b) and not torch.equal(b, c)
