"""precision_cast: the reference against ml_dtypes and against exact rational arithmetic, every kernel on
special values, double-rounding traps, every bit pattern and the integers, the scale, the compare rule,
bad input, the dispatcher, and every built-in kernel through the conformance kit."""
from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from core import dispatcher
from core.errors import InvalidInput
from core.ops.precision_cast import FORMATS, SPEC, TARGETS, CastResult, mixed_values, special_values
from core.spec import Sample
from core.tuning import judge
from plugins.fused import _build
from plugins.fused.precision_cast import precision_cast_cpu as fused_kernel
from plugins.fused.triton.precision_cast import precision_cast as triton_launcher
from plugins.reference.precision_cast import precision_cast as reference
from plugins.torch_backend.precision_cast import precision_cast as torch_kernel
from registry.conformance import check_case, conformance_cases

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the test-only peer for bit-exact casts")

NUMPY = {torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16,
         torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn, torch.float8_e5m2: ml_dtypes.float8_e5m2}
NAMES = {d: str(d).removeprefix("torch.") for d in TARGETS}


def triton_kernel(x, *, seed=None, **attrs):
    """The Triton launcher on CPU tensors (TRITON_INTERPRET=1, set by conftest)."""
    return triton_launcher(x, seed=0 if seed is None else seed, **attrs)


KERNELS = {"reference": reference, "torch": torch_kernel, "fused": fused_kernel, "triton": triton_kernel}
FAST = ["torch", "fused", "triton"]


def kernel(name):
    if name == "fused" and _build.unavailable_reason("precision_cast"):
        pytest.skip(f"fused C++ kernel unavailable here: {_build.unavailable_reason('precision_cast')}")
    return KERNELS[name]


def attrs(dtype, **kw):
    return {"dtype": dtype, "rounding": "nearest", "scaling": "none", "saturate": False, "margin": 0, "seed": None,
            **kw}


def bits(y):
    fmt = FORMATS[y.dtype]
    return y.contiguous().view(fmt.int_dtype).to(torch.int64) & ((1 << fmt.bits) - 1)


def peer_bits(values, dtype, saturate=False):
    """ml_dtypes' (numpy's for float16) round-to-nearest-even bits of float32 values; with saturate,
    overflow and +-inf replaced by +-max finite as the contract says (ml_dtypes does not saturate)."""
    x32 = values.float().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        y = x32.astype(NUMPY[dtype])
    raw = y.view(np.uint8 if FORMATS[dtype].bits == 8 else np.uint16).astype(np.int64)
    out = torch.from_numpy(raw)
    if saturate:
        fmt = FORMATS[dtype]
        y64 = torch.from_numpy(y.astype(np.float64))
        nan_from_finite = torch.isnan(y64) & ~torch.from_numpy(np.isnan(x32))  # e4m3fn's overflow
        over = torch.isinf(y64) | nan_from_finite | torch.isinf(torch.from_numpy(x32))
        sign = torch.from_numpy(np.signbit(x32)).long() << (fmt.bits - 1)
        out = torch.where(over, fmt.max_bits | sign, out)
    return out


def assert_same_bits(y, want, values):
    got = bits(y).reshape(-1)
    nan = torch.isnan(y.double().reshape(-1)) & torch.isnan(_from(want, y.dtype))
    bad = (got != want) & ~nan
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise AssertionError(f"{int(bad.sum())} of {got.numel()} differ; first: x={float(values.reshape(-1)[i])!r} "
                             f"gave {int(got[i]):#x}, expected {int(want[i]):#x}")


def _from(b, dtype):
    fmt = FORMATS[dtype]
    wide = torch.where(b >= 1 << (fmt.bits - 1), b - (1 << fmt.bits), b) if fmt.bits == 16 else b
    return wide.to(fmt.int_dtype).view(dtype).double()


def wide_random(gen, n):
    """float32 values with random bits over the whole float32 range (subnormals, inf and NaN included)."""
    raw = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    return raw.view(torch.float32)


# -- the reference and the fast kernels against ml_dtypes -----------------------------------------------

@pytest.mark.parametrize("saturate", [False, True], ids=["ocp", "saturate"])
@pytest.mark.parametrize("dtype", TARGETS, ids=NAMES.get)
def test_reference_bit_exact_with_ml_dtypes(dtype, saturate, gen):
    values = torch.cat([special_values(dtype).float(), mixed_values(gen, 1 << 18, dtype).float(),
                        wide_random(gen, 1 << 16), torch.randn(1 << 16, generator=gen) * 2.0 ** 20])
    out = reference(values, **attrs(dtype, saturate=saturate))
    assert_same_bits(out.y, peer_bits(values, dtype, saturate), values)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype", TARGETS, ids=NAMES.get)
def test_fast_kernels_bit_exact_with_ml_dtypes(name, dtype, gen):
    n = 1 << 16 if name != "triton" else 1 << 13  # the interpreter is slow
    for saturate in (False, True):
        values = torch.cat([special_values(dtype).float(), mixed_values(gen, n, dtype).float(),
                            wide_random(gen, n // 4)])
        out = kernel(name)(values, **attrs(dtype, saturate=saturate))
        assert_same_bits(out.y, peer_bits(values, dtype, saturate), values)


@pytest.mark.parametrize("dtype, n, scaling", [(torch.bfloat16, (1 << 25) + 13, "amax"),
                                               (torch.float8_e5m2, (1 << 26) + 5, "none")], ids=["bfloat16", "e5m2"])
def test_fused_large_outputs_with_streaming_stores(dtype, n, scaling, gen):
    """Outputs of 64 MiB or more take the streaming-store path (staged chunks, unaligned heads and tails
    at each thread's boundary): bit-exact with ml_dtypes there too."""
    special = special_values(dtype).float()
    values = torch.randn(n, generator=gen) * 2.0 ** torch.randint(-12, 12, (n,), generator=gen)
    for at in (0, n // 2 - 40, n - special.numel()):  # around the two threads' shares and both ends
        values[at:at + special.numel()] = special
    out = kernel("fused")(values, **attrs(dtype, scaling=scaling))
    scaled = values * out.scale if scaling == "amax" else values
    assert float(out.amax) == float(values[values.isfinite()].abs().max())
    assert int(out.nonfinite) == int((~values.isfinite()).sum())
    want_scale = torch.tensor(FORMATS[dtype].max_finite, dtype=torch.float32) / out.amax  # in float32
    assert float(out.scale) == (1.0 if scaling == "none" else float(want_scale))
    assert_same_bits(out.y, peer_bits(scaled, dtype), values)


@pytest.mark.parametrize("source", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["reference", *FAST])
def test_half_precision_sources(name, source, gen):
    for dtype in TARGETS:
        x = mixed_values(gen, 4096, dtype).to(source)
        out = kernel(name)(x, **attrs(dtype))
        assert_same_bits(out.y, peer_bits(x.float(), dtype), x)
        finite = torch.isfinite(x)
        assert int(out.nonfinite) == int((~finite).sum())
        assert float(out.amax) == float(x.float().abs()[finite].max())


# -- float64 sources: one rounding, no detour through float32 ---------------------------------------------

def _neighbours(y_bits, dtype):
    fmt = FORMATS[dtype]
    mag = y_bits & ((1 << (fmt.bits - 1)) - 1)
    sign = y_bits & (1 << (fmt.bits - 1))
    up = torch.where(mag < fmt.max_bits, mag + 1, mag) | sign
    down = torch.where(mag > 0, mag - 1, mag) | sign
    return _from(up, dtype), _from(down, dtype)


@pytest.mark.parametrize("name", ["reference", *FAST])
@pytest.mark.parametrize("dtype", TARGETS, ids=NAMES.get)
def test_float64_is_nearest_even_by_exact_arithmetic(name, dtype, gen):
    """For float64 values in range, y is at least as close as both neighbours, exactly (Fractions), and
    a tie goes to the even pattern."""
    fmt = FORMATS[dtype]
    v = mixed_values(gen, 1500, dtype)
    v = torch.where(torch.isfinite(v) & (v.abs() <= fmt.max_finite), v, 1.0)
    v = v + v * torch.rand(v.shape, generator=gen, dtype=torch.float64) * 2.0 ** -30  # bits float32 lacks
    out = kernel(name)(v, **attrs(dtype))
    b = bits(out.y)
    y = out.y.double()
    up, down = _neighbours(b, dtype)
    for vi, yi, ui, di, bi in zip(v.tolist(), y.tolist(), up.tolist(), down.tolist(), b.tolist()):
        d = abs(Fraction(vi) - Fraction(yi))
        for other in (ui, di):
            if other != yi:
                e = abs(Fraction(vi) - Fraction(other))
                assert d < e or (d == e and bi % 2 == 0), (vi, yi, other)
        assert math.copysign(1.0, yi) == math.copysign(1.0, vi)


def double_rounding_traps(gen, dtype, n=300):
    """(v, expected bits): v = the midpoint of two neighbours plus or minus a nudge below float32's
    resolution, so float64 -> float32 -> target lands on the tie and may go the wrong way."""
    fmt = FORMATS[dtype]
    p = torch.randint(1, fmt.max_bits, (n,), generator=gen)
    lo, hi = _from(p, dtype), _from(p + 1, dtype)
    mid = (lo + hi) / 2
    nudge = mid * 2.0 ** -40
    v = torch.cat([mid + nudge, mid - nudge, -(mid + nudge)])
    want = torch.cat([p + 1, p, (p + 1) | (1 << (fmt.bits - 1))])
    assert bool((v.float().double() == torch.cat([mid, mid, -mid])).all())  # float32 alone would see a tie
    return v, want


@pytest.mark.parametrize("name", ["reference", *FAST])
@pytest.mark.parametrize("dtype", TARGETS, ids=NAMES.get)
def test_double_rounding_traps(name, dtype, gen):
    v, want = double_rounding_traps(gen, dtype)
    out = kernel(name)(v, **attrs(dtype))
    assert_same_bits(out.y, want, v)


# -- every pattern, every integer -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["reference", *FAST])
@pytest.mark.parametrize("dtype", TARGETS, ids=NAMES.get)
def test_every_bit_pattern_round_trips(name, dtype):
    fmt = FORMATS[dtype]
    patterns = torch.arange(1 << fmt.bits)
    values = _from(patterns, dtype)
    for source in (torch.float32, torch.float64):
        out = kernel(name)(values.to(source), **attrs(dtype))
        got = bits(out.y)
        nan = torch.isnan(values)
        assert bool(torch.isnan(out.y.double())[nan].all())
        assert torch.equal(got[~nan], patterns[~nan]), f"from {source}"


@pytest.mark.parametrize("name", ["reference", *FAST])
@pytest.mark.parametrize("dtype", TARGETS, ids=NAMES.get)
def test_integers_up_to_the_maximum(name, dtype):
    """Every integer in [-max, max] (bfloat16: up to 2**17, then every representable integer up to max):
    the same bits as ml_dtypes, and the representable ones come back exactly."""
    fmt = FORMATS[dtype]
    top = int(fmt.max_finite) if fmt.bits == 8 or dtype == torch.float16 else 1 << 17
    ints = torch.arange(-top, top + 1, dtype=torch.float64)
    if dtype == torch.bfloat16:
        pats = _from(torch.arange(0, fmt.max_bits + 1), dtype)
        ints = torch.cat([ints, pats[(pats == pats.floor()) & (pats > top)]])
    if name == "triton":
        ints = ints[torch.linspace(0, ints.numel() - 1, 6000).long()]
    out = kernel(name)(ints.float(), **attrs(dtype))
    assert_same_bits(out.y, peer_bits(ints.float(), dtype), ints)
    y = out.y.double()
    representable = y == ints
    assert int(representable.sum()) > 0
    exact = ints.abs() <= 2 ** (fmt.man_bits + 1)  # every integer up to 2**(man+1) is representable
    assert bool(representable[exact].all())


# -- statistics and the scale ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["reference", *FAST])
def test_scaling_amax(name, gen):
    for dtype in TARGETS:
        fmt = FORMATS[dtype]
        for margin in (0, 3):
            x = torch.randn(3000, generator=gen) * float(torch.exp2(torch.randint(-30, 30, (), generator=gen)))
            x[7], x[11] = math.inf, math.nan
            out = kernel(name)(x, **attrs(dtype, scaling="amax", margin=margin))
            amax = np.float32(x[torch.isfinite(x)].abs().max())
            with np.errstate(over="ignore"):
                want = min(np.float32(fmt.max_finite) / amax / np.float32(2.0 ** margin), np.finfo(np.float32).max)
            assert float(out.amax) == float(amax) and out.amax.dtype == torch.float32
            assert float(out.scale) == float(want) and out.scale.dtype == torch.float32
            assert int(out.nonfinite) == 2 and out.nonfinite.dtype == torch.int64
            finite = torch.isfinite(x)
            back = out.y.double()[finite] / float(out.scale)
            rel = ((back - x.double()[finite]).abs() / x.double()[finite].abs().clamp(min=1e-30))
            big = x.double()[finite].abs() > float(amax) * 2.0 ** -4  # clear of the target's subnormals
            assert float(rel[big].max()) <= 2.0 ** -fmt.man_bits  # half a spacing, relative


@pytest.mark.parametrize("name", ["reference", *FAST])
def test_scale_corner_cases(name):
    f32max = float(torch.finfo(torch.float32).max)
    run = kernel(name)
    nothing = run(torch.tensor([math.inf, -math.inf, math.nan]), **attrs(torch.float8_e4m3fn, scaling="amax"))
    assert float(nothing.scale) == 1.0 and float(nothing.amax) == 0.0 and int(nothing.nonfinite) == 3
    zeros = run(torch.zeros(5), **attrs(torch.float16, scaling="amax"))
    assert float(zeros.scale) == 1.0 and float(zeros.amax) == 0.0
    tiny = run(torch.tensor([2.0 ** -149, 0.0]), **attrs(torch.float16, scaling="amax"))
    assert float(tiny.scale) == f32max  # 65504 / 2**-149 is inf in float32: capped
    if name != "triton":
        huge = run(torch.tensor([1e300, 2.0], dtype=torch.float64), **attrs(torch.bfloat16, scaling="amax"))
        assert math.isinf(float(huge.amax)) and float(huge.scale) == 1.0  # amax past float32: not finite
    empty = run(torch.empty(0, 3), **attrs(torch.float8_e5m2, scaling="amax"))
    assert empty.y.shape == (0, 3) and float(empty.amax) == 0.0 and int(empty.nonfinite) == 0
    assert float(empty.scale) == 1.0


@pytest.mark.parametrize("name", ["reference", *FAST])
def test_layouts(name, gen):
    base = torch.randn(40, 66, generator=gen)
    for x in (base[:, ::3], base.t(), base[3], torch.tensor(2.5)):
        out = kernel(name)(x, **attrs(torch.bfloat16))
        assert out.y.shape == x.shape and out.y.dtype == torch.bfloat16
        assert_same_bits(out.y, peer_bits(x.contiguous().reshape(-1), torch.bfloat16), x)


@pytest.mark.parametrize("dtype", TARGETS)
def test_fused_casts_a_permuted_tensor_in_memory_order_and_keeps_its_strides(dtype, gen):
    # x.to(dtype) keeps a transposed (any permuted, dense) tensor's strides and casts it as its memory
    # lies; the fused kernel does the same instead of copying it to row-major order first (15x the cast)
    specials = special_values(dtype)
    base = torch.randn(6, 50, 7, generator=gen) * 300
    base.view(-1)[: specials.numel()] = specials.float()  # ties, overflow, inf and NaN among them
    for x in (base.permute(2, 0, 1), base.transpose(0, 2), base[:, :, 2:5].transpose(0, 1)):
        for scaling in ("none", "amax"):
            out = fused_kernel(x, **attrs(dtype, scaling=scaling))
            want = reference(x.contiguous(), **attrs(dtype, scaling=scaling))
            assert out.y.shape == x.shape
            if x.is_contiguous() or x.permute(*sorted(range(3), key=lambda d: -x.stride(d))).is_contiguous():
                assert out.y.stride() == x.to(dtype).stride() == x.stride()
            assert_same_bits(out.y, bits(want.y).reshape(-1), x)
            assert torch.equal(out.amax, want.amax) and torch.equal(out.scale, want.scale)
            assert int(out.nonfinite) == int(want.nonfinite)
    # stochastic rounding keeps the logical order: a seed gives one y whatever the layout
    x = base.permute(2, 0, 1)
    a = fused_kernel(x, **attrs(dtype, rounding="stochastic", seed=7))
    b = fused_kernel(x.contiguous(), **attrs(dtype, rounding="stochastic", seed=7))
    assert torch.equal(bits(a.y).reshape(-1), bits(b.y).reshape(-1))


@pytest.mark.parametrize("name", ["reference", *FAST])
def test_input_that_requires_grad(name, gen):
    x = torch.randn(500, generator=gen).requires_grad_(True)
    out = kernel(name)(x, **attrs(torch.float8_e5m2, scaling="amax"))
    assert not any(t.requires_grad for t in out)  # a cast has no gradient; nothing keeps x's graph alive
    assert float(out.amax) == float(x.detach().abs().max())


# -- the compare rule ----------------------------------------------------------------------------------

def _flip(y, i, mask=1):
    fmt = FORMATS[y.dtype]
    raw = y.clone().view(fmt.int_dtype)
    raw.view(-1)[i] ^= mask
    return raw.view(y.dtype)


def test_compare_rule_rejects_wrong_answers(gen):
    x = mixed_values(gen, 2000, torch.float8_e5m2).float()
    sample = Sample(args=(x,), attrs=attrs(torch.float8_e5m2))
    ref = reference(x, **sample.attrs)
    assert judge(SPEC, ref, ref, sample).ok
    finite = torch.isfinite(ref.y.double()).nonzero()[:, 0]
    i = int(finite[0])
    verdict = judge(SPEC, ref._replace(y=_flip(ref.y, i)), ref, sample)
    assert not verdict.ok and "differ in their bits" in verdict.reason
    zero = torch.tensor([-0.0, 0.0])
    zs = Sample(args=(zero,), attrs=attrs(torch.float8_e5m2))
    zref = reference(zero, **zs.attrs)
    assert not judge(SPEC, zref._replace(y=_flip(zref.y, 0, 0x80)), zref, zs).ok  # -0 became +0
    for field, value in (("amax", ref.amax * 2), ("scale", ref.scale * 2), ("nonfinite", ref.nonfinite + 1)):
        verdict = judge(SPEC, ref._replace(**{field: value}), ref, sample)
        assert not verdict.ok and field in verdict.reason


def test_compare_rule_for_stochastic_accepts_neighbours_only(gen):
    dtype = torch.float16
    x = mixed_values(gen, 3000, dtype).float()
    sample = Sample(args=(x,), attrs=attrs(dtype, rounding="stochastic", seed=3))
    ref = reference(x, **sample.attrs)
    down = reference(x, **attrs(dtype)).y  # nearest is always one of the two neighbours
    assert judge(SPEC, ref._replace(y=down), ref, sample).ok
    assert judge(SPEC, torch_kernel(x, **{**sample.attrs, "seed": 9}), ref, sample).ok
    fmt = FORMATS[dtype]
    inexact = ((down.double() != x.double()) & torch.isfinite(x) & (x.abs() < fmt.max_finite / 4)).nonzero()[:, 0]
    i = int(inexact[0])
    raw = down.clone().view(fmt.int_dtype)
    raw.view(-1)[i] += 2  # two patterns past the nearest: never a neighbour of an inexact x
    verdict = judge(SPEC, ref._replace(y=raw.view(dtype)), ref, sample)
    assert not verdict.ok and "not a neighbour" in verdict.reason
    big = Sample(args=(torch.tensor([1e6, -1e6, 65520.0]),), attrs=attrs(dtype, rounding="stochastic", seed=1))
    bref = reference(*big.args, **big.attrs)
    assert judge(SPEC, bref, bref, big).ok
    clamped = torch.tensor([65504.0, -65504.0, 65504.0], dtype=dtype)  # 1e6 is past both neighbours
    assert not judge(SPEC, bref._replace(y=clamped), bref, big).ok


# -- bad input -----------------------------------------------------------------------------------------

BAD = [
    (lambda: (torch.arange(4), {"dtype": torch.float16}),
     "precision_cast: argument 'x': expected a floating tensor of dtype torch.float64, torch.float32, "
     "torch.bfloat16, torch.float16, got dtype torch.int64"),
    (lambda: ([1.0, 2.0], {"dtype": torch.float16}), "argument 'x': expected a torch.Tensor, got list"),
    (lambda: (torch.ones(2), {"dtype": torch.float32}),
     "argument 'dtype': expected one of torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, "
     "got torch.float32"),
    (lambda: (torch.ones(2), {"dtype": "fp8"}), "argument 'dtype': expected one of torch.float16"),
    (lambda: (torch.ones(2), {}), "argument 'dtype': expected a value (it is required), got nothing"),
    (lambda: (torch.ones(2), {"dtype": torch.float16, "rounding": "up"}),
     "argument 'rounding': expected one of ['nearest', 'stochastic'], got 'up'"),
    (lambda: (torch.ones(2), {"dtype": torch.float16, "scaling": "max"}),
     "argument 'scaling': expected one of ['none', 'amax'], got 'max'"),
    (lambda: (torch.ones(2), {"dtype": torch.float16, "saturate": 1}), "argument 'saturate': expected a bool, got 1"),
    (lambda: (torch.ones(2), {"dtype": torch.float16, "margin": -1}),
     "argument 'margin': expected an int in [0, 127] (2**margin must be a float32 power of two), got -1"),
    (lambda: (torch.ones(2), {"dtype": torch.float16, "margin": True}), "argument 'margin': expected an int"),
    (lambda: (torch.ones(2), {"dtype": torch.float16, "seed": -5}),
     "argument 'seed': expected None or an int in [0, 2**63), got -5"),
    (lambda: (torch.ones(2), {"dtype": torch.float16, "seed": 1.5}), "argument 'seed': expected None or an int"),
    (lambda: (torch.ones(2), {"dtype": torch.float16, "round": "nearest"}), "argument 'round': expected one of"),
]


@pytest.mark.parametrize("make,message", BAD)
def test_bad_input_is_explained(make, message):
    x, kw = make()
    with pytest.raises(InvalidInput) as info:
        dispatcher.precision_cast(x, **kw)
    assert message in str(info.value)


# -- the dispatcher and the conformance kit -------------------------------------------------------------

def test_dispatcher_end_to_end(gen):
    x = mixed_values(gen, 5000, torch.float8_e4m3fn).float().reshape(50, 100)
    out = dispatcher.precision_cast(x, dtype=torch.float8_e4m3fn, saturate=True)
    assert isinstance(out, CastResult)
    want = reference(x, **attrs(torch.float8_e4m3fn, saturate=True))
    assert judge(SPEC, out, want, Sample(args=(x,), attrs=attrs(torch.float8_e4m3fn, saturate=True))).ok
    explanation = dispatcher.explain("precision_cast", x, dtype=torch.float8_e4m3fn, saturate=True)
    rows = {r.backend: r for r in explanation.rows}
    assert {"reference", "torch", "fused", "fused-triton"} <= set(rows)
    assert rows["fused-triton"].status == "unsupported" and "device 'cpu'" in rows["fused-triton"].reason
    assert rows["torch"].status in ("ok", "chosen")
    assert explanation.chosen in ("torch", "fused")
    assert "float8_e4m3fn" in str(explanation)
    for backend in ("reference", "torch", "fused"):
        with dispatcher.use_backend(backend):
            forced = dispatcher.precision_cast(x.t(), dtype=torch.bfloat16, rounding="stochastic", seed=5)
        assert torch.equal(bits(forced.y), bits(KERNELS[backend](x.t(), **attrs(torch.bfloat16, rounding="stochastic",
                                                                                  seed=5)).y))


def test_fused_without_compiler_falls_back(monkeypatch, gen):
    monkeypatch.setenv(_build.ENV_DISABLE, "1")
    dispatcher.reset()
    try:
        x = torch.randn(300, generator=gen, dtype=torch.float64)  # a dispatch key no other test uses
        explanation = dispatcher.explain("precision_cast", x, dtype=torch.float16, saturate=True)
        fused = next(r for r in explanation.rows if r.backend == "fused")
        assert fused.status == "unsupported" and _build.ENV_DISABLE in fused.reason
        out = dispatcher.precision_cast(x, dtype=torch.float16, saturate=True)
        assert torch.equal(bits(out.y), bits(reference(x, **attrs(torch.float16, saturate=True)).y))
    finally:
        dispatcher.reset()


# -- the fused CPU kernel's output pool -------------------------------------------------------------------

POOLED = 1 << 20  # float32 elements: a 2 MiB bfloat16 output, a block of the pool's 2 MiB grain


@pytest.fixture
def pool():
    """The fused module with an emptied pool of a known cap, restored afterwards."""
    kernel("fused")
    import plugins.fused.precision_cast as module

    old = module.set_output_pool_limit(64 << 20)
    module.empty_output_pool()
    yield module
    module.set_output_pool_limit(old)


def test_output_pool_reuses_freed_blocks_and_never_live_ones(pool, gen):
    xs = [torch.randn(POOLED, generator=gen) * 4 for _ in range(3)]
    before = pool.output_pool_stats()
    ys = [fused_kernel(x, **attrs(torch.bfloat16)).y for x in xs[:2]]  # both alive: two distinct blocks
    assert ys[0].data_ptr() != ys[1].data_ptr()
    freed = ys.pop().data_ptr()
    assert pool.output_pool_stats()["idle_bytes"] >= 2 * POOLED
    ys.append(fused_kernel(xs[2], **attrs(torch.bfloat16)).y)
    after = pool.output_pool_stats()
    assert ys[1].data_ptr() == freed
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 2)
    for x, y in zip((xs[0], xs[2]), ys):  # reuse overwrote nothing that is still alive
        assert torch.equal(bits(y), bits(reference(x, **attrs(torch.bfloat16)).y))


def test_mid_sized_outputs_are_pooled_in_64_kib_blocks(pool, gen):
    # from 128 KiB (where a fresh output may come from mmap) to 2 MiB, blocks round up to 64 KiB
    x = torch.randn(100_000, generator=gen)  # a 200,000-byte float16 output: a 256 KiB block
    before = pool.output_pool_stats()
    y = fused_kernel(x, **attrs(torch.float16)).y
    first = y.data_ptr()
    assert torch.equal(bits(y), bits(reference(x, **attrs(torch.float16)).y))
    del y
    assert pool.output_pool_stats()["idle_bytes"] - before["idle_bytes"] == 256 << 10
    y = fused_kernel(x * 2, **attrs(torch.float16)).y
    after = pool.output_pool_stats()
    assert y.data_ptr() == first and after["hits"] - before["hits"] == 1
    assert torch.equal(bits(y), bits(reference(x * 2, **attrs(torch.float16)).y))
    small = fused_kernel(x[:1000], **attrs(torch.float16)).y  # 2,000 bytes: torch's allocator, not the pool
    assert pool.output_pool_stats()["misses"] == after["misses"] and small.shape == (1000,)


def test_pooled_output_is_an_ordinary_tensor(pool, gen):
    x = torch.randn(2, POOLED // 2, generator=gen)
    y = fused_kernel(x, **attrs(torch.float8_e5m2)).y
    want = bits(reference(x, **attrs(torch.float8_e5m2)).y)
    assert y.shape == x.shape and y.is_contiguous() and not y.requires_grad
    y.resize_(3, POOLED // 2)  # grows through the pool's allocator, keeping the old values
    assert torch.equal(bits(y[:2]), want)
    y[2] = 1.0
    buffer = io.BytesIO()
    torch.save(y, buffer)
    buffer.seek(0)
    assert torch.equal(bits(torch.load(buffer)), bits(y))


@pytest.mark.parametrize("scaling", ["none", "amax"])
def test_fused_statistics_are_independent_scalars(scaling, gen):
    # scale and amax come from one small allocation: each must still be its own 0-d tensor, right,
    # writable without touching the others, and saved and loaded (with nonfinite) as itself
    x = torch.randn(5000, generator=gen) * 7
    x[17], x[4000], x[123] = float("inf"), float("nan"), -float("inf")
    out = fused_kernel(x, **attrs(torch.float8_e4m3fn, scaling=scaling))
    ref = reference(x, **attrs(torch.float8_e4m3fn, scaling=scaling))
    finite = x[torch.isfinite(x)].abs().max()
    for t, dtype in ((out.scale, torch.float32), (out.amax, torch.float32), (out.nonfinite, torch.int64)):
        assert t.dim() == 0 and t.dtype == dtype and t.is_contiguous() and not t.requires_grad
    assert float(out.amax) == float(finite) and int(out.nonfinite) == 3
    assert torch.equal(out.scale, ref.scale) and torch.equal(out.amax, ref.amax)
    scale, amax = float(out.scale), float(out.amax)
    out.nonfinite.add_(5)
    out.scale.mul_(2)
    assert float(out.amax) == amax and float(out.scale) == 2 * scale and int(out.nonfinite) == 8
    out.amax.fill_(-1.0)
    assert float(out.scale) == 2 * scale and int(out.nonfinite) == 8
    buffer = io.BytesIO()
    torch.save([out.scale, out.amax, out.nonfinite], buffer)
    buffer.seek(0)
    assert [float(t) for t in torch.load(buffer)] == [2 * scale, -1.0, 8.0]


def test_output_pool_cap(pool, gen):
    x = torch.randn(POOLED, generator=gen)
    assert pool.set_output_pool_limit(0) == 64 << 20
    fused_kernel(x, **attrs(torch.bfloat16))
    assert pool.output_pool_stats()["idle_bytes"] == 0  # off: the freed output went back to the OS
    pool.set_output_pool_limit(1 << 20)
    fused_kernel(x, **attrs(torch.bfloat16))
    assert pool.output_pool_stats()["idle_bytes"] == 0  # a 2 MiB block does not fit under a 1 MiB cap
    pool.set_output_pool_limit(5 << 20)
    outs = [fused_kernel(x, **attrs(torch.bfloat16)).y for _ in range(3)]
    del outs
    assert pool.output_pool_stats()["idle_bytes"] == 4 << 20  # two of the three freed blocks fit
    assert pool.empty_output_pool() == 4 << 20 and pool.output_pool_stats()["idle_bytes"] == 0
    with pytest.raises(RuntimeError, match="must be >= 0"):
        pool.set_output_pool_limit(-1)


@pytest.mark.parametrize("value, limit", [("0", 0), ("16", 16 << 20), ("lots", 1024 << 20)])
def test_output_pool_cap_from_the_environment(monkeypatch, value, limit):
    import plugins.fused.precision_cast as module

    monkeypatch.setenv(module.POOL_ENV, value)
    if value.isdigit():
        assert module.pool_limit_from_env() == limit
    else:
        with pytest.warns(RuntimeWarning, match=module.POOL_ENV):
            assert module.pool_limit_from_env() == limit


BUILTIN = [c for backend in ("reference", "torch", "fused") for c in conformance_cases(backend, ops=["precision_cast"])]


@pytest.mark.parametrize("case", BUILTIN, ids=str)
def test_builtin_kernels_conform(case):
    check_case(case)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # float64 amax past float32: inf
@pytest.mark.parametrize("name", list(SPEC.edge_cases))
def test_triton_on_every_edge_case(name, gen):
    """The Triton kernel is CUDA-only in dispatch; here its launcher runs under the interpreter."""
    sample = SPEC.edge_cases[name](gen, "cpu")
    args, full = SPEC.prepare(sample.args, sample.attrs)
    out = triton_kernel(*args, **full)
    verdict = judge(SPEC, out, reference(*args, **full), Sample(args=args, attrs=full))
    assert verdict.ok, verdict.reason


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # float64 amax past float32: inf
def test_gpu_check_logic_under_the_interpreter():
    """The GPU check's own logic, at toy sizes on the CPU (the real run needs CUDA)."""
    from plugins.fused.triton.precision_cast import gpu_check

    rows = gpu_check("cpu", check_log2=11, time_log2=10, reps=1)
    assert len(rows) == 16 + len(SPEC.edge_cases)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    assert all({"kernel", "case", "ok", "max_error", "ms", "note"} <= set(r) for r in rows)


@pytest.mark.parametrize("n,contiguous", [(0, True), (1, True), (1000, True), (1025, False)])
def test_verify_returns_the_dispatch_key(n, contiguous, gen):
    x = torch.randn(n, 2, generator=gen)
    x = x[:, 0] if not contiguous else x.reshape(-1)[:n]
    for dtype in TARGETS:
        for attrs in ({}, {"scaling": "amax", "saturate": True}, {"rounding": "stochastic", "seed": 3}):
            args, full = SPEC.bind((x,), {"dtype": dtype, **attrs})
            key = SPEC.verify(args, full)
            assert key is not None and key == SPEC.key(args, full)


def test_bad_attributes_are_named_on_a_warm_key_too(gen):
    # the rules remember attributes they accepted; True == 1 and unhashable values must not pass for them
    x = torch.randn(64, generator=gen)
    dispatcher.precision_cast(x, dtype=torch.float16, margin=1)
    for attrs, message in (({"saturate": 1}, r"'saturate': expected a bool, got 1"),
                           ({"margin": True}, r"'margin': expected an int in \[0, 127\].*got True"),
                           ({"rounding": ["nearest"]}, r"'rounding': expected one of .*got \['nearest'\]"),
                           ({"seed": -1}, r"'seed': expected None or an int in \[0, 2\*\*63\), got -1")):
        with pytest.raises(InvalidInput, match="precision_cast: argument " + message):
            dispatcher.precision_cast(x, dtype=torch.float16, **{"margin": 1, **attrs})
    with pytest.raises(InvalidInput, match=r"argument 'x': expected a floating tensor"):
        dispatcher.precision_cast(x.int(), dtype=torch.float16)
