"""precision_cast on every instruction-set level of the fused C++ kernel (the machine's best, AVX2 and the
scalar fallback, each a separate build of csrc/precision_cast.cpp), and the torch-cast kernel (the peer
``x.to(dtype)`` where it is exact): bit for bit against ml_dtypes and the numpy reference on fresh
random data with the boundary values mixed in (subnormals, ties, max finite, the overflow threshold and
around it, inf, NaN), all four targets, both overflow rules, scaling "none" and "amax", stochastic
rounding by the neighbour rule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core import dispatcher
from core.ops.precision_cast import FORMATS, SPEC, TARGETS, mixed_values, neighbour_problem, scaled_values, special_values
from core.spec import Sample
from core.tuning import judge
from plugins.fused import _build
from plugins.fused.precision_cast import cpu_flags
from plugins.fused.precision_cast import precision_cast_cpu as fused_kernel
from plugins.reference.precision_cast import precision_cast as reference
from plugins.torch_backend.precision_cast import CAST_SOURCES, _cast_check, cast, cast_saturates
from registry.conformance import check_case, conformance_cases
from test_precision_cast import NAMES, assert_same_bits, attrs, bits, peer_bits, wide_random

OP = "precision_cast"
LEVELS = [isa for isa in ("avx512", "avx2", "scalar") if isa in _build.supported_isas()]

pytestmark = pytest.mark.skipif(_build.unavailable_reason(OP) is not None,
                                reason=f"fused C++ kernel unavailable here: {_build.unavailable_reason(OP)}")


def boundary_mix(gen, dtype, n):
    """float32 values: the boundary values of ``dtype`` scattered among mixed values (exact patterns,
    exact ties, log-uniform magnitudes, specials) and random float32 bit patterns, so that the vector
    loops see them in every lane and the scalar tails see them too."""
    special = special_values(dtype).float()
    values = torch.cat([mixed_values(gen, n, dtype).float(), wide_random(gen, n // 4)])
    at = torch.randint(0, values.numel(), (4 * special.numel(),), generator=gen)
    values[at] = special.repeat(4)
    return torch.cat([special, values])


def run(isa, x, **kw):
    """The whole fused kernel (the Python wrapper included) on the ``isa`` build."""
    with _build.forced_isa(isa):
        assert _build.library(OP) is _build.library(OP, isa)
        return fused_kernel(x, **attrs(kw.pop("dtype"), **kw))


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("dtype", TARGETS, ids=NAMES.get)
def test_every_level_bit_exact(isa, dtype, gen):
    """scaling none against ml_dtypes (both overflow rules), scaling amax against the reference (y, scale,
    amax and the non-finite count exact); lengths that leave every tail length of the vector loops."""
    for saturate in (False, True):
        for n in (3000 + int(torch.randint(0, 64, (), generator=gen)), 61):
            values = boundary_mix(gen, dtype, n)
            out = run(isa, values, dtype=dtype, saturate=saturate)
            assert_same_bits(out.y, peer_bits(values, dtype, saturate), values)
            finite = values.isfinite()
            assert float(out.amax) == float(values[finite].abs().max())
            assert int(out.nonfinite) == int((~finite).sum())
            assert float(out.scale) == 1.0
            scaled = run(isa, values, dtype=dtype, saturate=saturate, scaling="amax", margin=n % 3)
            want = reference(values, **attrs(dtype, saturate=saturate, scaling="amax", margin=n % 3))
            for field in ("scale", "amax", "nonfinite"):
                assert float(getattr(scaled, field)) == float(getattr(want, field)), field
            assert_same_bits(scaled.y, bits(want.y).reshape(-1), values)


@pytest.mark.skipif("avx512" not in LEVELS, reason="this CPU runs no AVX-512 build")
@pytest.mark.parametrize("instruction", [True, False], ids=["vcvtneps2bf16", "integer-rule"])
def test_avx512_bfloat16_by_instruction_and_by_integer_rule(instruction, gen):
    """The AVX-512 build casts float32 to bfloat16 with AVX512_BF16's conversion where the CPU has it, else
    with the integer rule: both, on the same data. The conversion flushes subnormal inputs to zero, so runs
    of float32 subnormals (whole vectors of them, and single ones among normal values) check the lanes it
    hands back to the integer rule; boundary values, both overflow rules, scaling amax and float64 sources
    check the rest against ml_dtypes and the reference."""
    lib = _build.library(OP, "avx512")
    if instruction and not lib.precision_cast_bf16_instruction(True):
        pytest.skip("this CPU has no AVX512_BF16 conversion")
    dtype = torch.bfloat16
    try:
        assert lib.precision_cast_bf16_instruction(instruction) == instruction
        subnormal = torch.randint(1, 1 << 23, (3 * 64,), generator=gen, dtype=torch.int32).view(torch.float32)
        subnormal = subnormal * (torch.randint(0, 2, (3 * 64,), generator=gen) * 2 - 1).float()
        for saturate in (False, True):
            values = boundary_mix(gen, dtype, 4000)
            values[torch.randint(0, values.numel(), (100,), generator=gen)] = subnormal[:100]
            values = torch.cat([subnormal, values])
            assert int(((values != 0) & (values.abs() < 2.0 ** -126)).sum()) >= 250
            out = run("avx512", values, dtype=dtype, saturate=saturate)
            assert_same_bits(out.y, peer_bits(values, dtype, saturate), values)
            finite = values.isfinite()
            assert float(out.amax) == float(values[finite].abs().max())
            assert int(out.nonfinite) == int((~finite).sum())
            for x in (values, values.double() * (1 + 2.0 ** -30)):  # float32 scaled; float64 rounded once
                scaled = run("avx512", x, dtype=dtype, saturate=saturate, scaling="amax", margin=1)
                want = reference(x, **attrs(dtype, saturate=saturate, scaling="amax", margin=1))
                for field in ("scale", "amax", "nonfinite"):
                    assert float(getattr(scaled, field)) == float(getattr(want, field)), field
                assert_same_bits(scaled.y, bits(want.y).reshape(-1), values)
                plain = run("avx512", x, dtype=dtype, saturate=saturate)
                assert_same_bits(plain.y, bits(reference(x, **attrs(dtype, saturate=saturate)).y).reshape(-1), values)
    finally:
        lib.precision_cast_bf16_instruction(True)


@pytest.mark.parametrize("isa", LEVELS)
def test_every_level_parallel_and_chunk_edges(isa, gen):
    """Past the parallel grain (two threads' shares, 2048-element chunks) with specials at the chunk and
    share boundaries, and a chunk holding NaN beside chunks that do not."""
    n = (1 << 20) + 37
    values = torch.randn(n, generator=gen) * 2.0 ** torch.randint(-30, 30, (n,), generator=gen)
    special = special_values(torch.float8_e4m3fn).float()
    for at in (0, 2048 - 5, n // 2 - 20, n - special.numel()):
        values[at:at + special.numel()] = special
    for dtype in (torch.float16, torch.float8_e4m3fn):
        out = run(isa, values, dtype=dtype)
        assert_same_bits(out.y, peer_bits(values, dtype), values)
        finite = values.isfinite()
        assert float(out.amax) == float(values[finite].abs().max())
        assert int(out.nonfinite) == int((~finite).sum())
    # float16 and bfloat16 sources, widened a chunk at a time (float16 by the hardware conversion)
    for source, dtype in ((torch.float16, torch.bfloat16), (torch.float16, torch.float8_e5m2),
                          (torch.bfloat16, torch.float16), (torch.bfloat16, torch.float8_e4m3fn)):
        x = values.to(source)
        wide = x.float()
        for scaling in ("none", "amax"):
            out = run(isa, x, dtype=dtype, scaling=scaling)
            want = reference(x, **attrs(dtype, scaling=scaling))
            assert_same_bits(out.y, bits(want.y).reshape(-1), wide)
            for field in ("scale", "amax", "nonfinite"):
                assert float(getattr(out, field)) == float(getattr(want, field)), (source, dtype, field)
        assert_same_bits(run(isa, x, dtype=dtype).y, peer_bits(wide, dtype), wide)


def splitmix_draws(seed, n):
    """The fused kernel's stochastic draws for elements 0..n-1: SplitMix64's output for (seed, index),
    its top 32 bits (csrc/precision_cast.cpp, draw32), computed here in wrapping uint64 arithmetic."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) >> np.uint64(32)


def lane_edges(n, itemsize, threads):
    """Where the kernel's walk of a source of 16 MiB or more changes stream: each thread's share (whole
    64-element blocks) is walked as four lanes of equal length side by side, 512 bytes of each in turn, then
    the rest in chunks (csrc/precision_cast.cpp, pass)."""
    piece = 512 // itemsize
    blocks = (n + 63) // 64
    edges = []
    for t in range(threads):
        begin, end = min(n, blocks * t // threads * 64), min(n, blocks * (t + 1) // threads * 64)
        span = (end - begin) // (4 * piece) * piece
        edges += [begin + lane * span for lane in range(5)] + [begin + span + piece, end]
    return edges


@pytest.mark.parametrize("isa", LEVELS)
def test_every_level_lanes_of_a_large_source(isa, gen):
    """Sources of 16 MiB or more take the lanes walk: bit-exact there (ml_dtypes for scaling none, the
    float32 product x * scale through ml_dtypes for amax; the reference for float64, which rounds once),
    with specials at every lane's, piece's and share's edge and scattered, NaN among them (the vector loops
    redo a piece holding one), for float32, float16 (widened a piece at a time) and float64 sources; stochastic
    rounding the same on one thread as on two, each element's draw the one of its index."""
    for source, n in ((torch.float32, (1 << 22) + 1000 + int(torch.randint(0, 64, (), generator=gen))),
                      (torch.float16, (1 << 23) + 77), (torch.float64, (1 << 21) + 3)):
        dtype = torch.float8_e4m3fn if source != torch.float16 else torch.float8_e5m2
        values = torch.randn(n, generator=gen) * 2.0 ** torch.randint(-6, 6, (n,), generator=gen)
        special = special_values(dtype).float()
        k = special.numel()
        for at in lane_edges(n, source.itemsize, torch.get_num_threads()):
            at = min(max(at - k // 2, 0), n - k)
            values[at:at + k] = special
        values[torch.randint(0, n, (64,), generator=gen)] = special[torch.randint(0, k, (64,), generator=gen)]
        x = values.to(source)
        wide = x.double() if source == torch.float64 else x.float()
        finite = wide.isfinite()
        for scaling in ("none", "amax"):
            out = run(isa, x, dtype=dtype, scaling=scaling)
            assert float(out.amax) == float(wide[finite].abs().max().float())
            assert int(out.nonfinite) == int((~finite).sum())
            if source == torch.float64:
                want = reference(x, **attrs(dtype, scaling=scaling))
                assert float(out.scale) == float(want.scale)
                assert_same_bits(out.y, bits(want.y).reshape(-1), wide)
                continue
            want_scale = torch.tensor(FORMATS[dtype].max_finite, dtype=torch.float32) / out.amax
            assert float(out.scale) == (1.0 if scaling == "none" else float(want_scale))
            assert_same_bits(out.y, peer_bits(wide * out.scale if scaling == "amax" else wide, dtype), wide)
        if source == torch.float32:
            # stochastic rounding draws by element index: each lane's pieces must pass their own offsets,
            # so one thread (other shares, other lanes) draws the same; every element a neighbour
            kw = {"dtype": dtype, "rounding": "stochastic", "scaling": "amax", "seed": 7}
            out = run(isa, x, **kw)
            threads = torch.get_num_threads()
            torch.set_num_threads(1 if threads > 1 else 2)
            try:
                again = run(isa, x, **kw)
            finally:
                torch.set_num_threads(threads)
            assert torch.equal(bits(again.y), bits(out.y))
            count, example = neighbour_problem(out.y, scaled_values(x, out.scale), FORMATS[dtype], False)
            assert count == 0, example
            # the draw itself: every element halfway between 1 and the next e4m3 value rounds up exactly
            # when SplitMix64's draw for (seed, its index) is below 2^31
            half = torch.full((n,), 1.0 + 2.0 ** -(FORMATS[dtype].man_bits + 1))
            up = run(isa, half, dtype=dtype, rounding="stochastic", seed=7).y.float() > 1
            assert torch.equal(up, torch.from_numpy(splitmix_draws(7, n) < 2 ** 31))


@pytest.mark.parametrize("isa", LEVELS)
def test_every_level_other_sources(isa, gen):
    """float64 (rounded once, the level's scalar loops), bfloat16 and float16 sources (widened to float32)."""
    for source in (torch.float64, torch.bfloat16, torch.float16):
        for dtype in TARGETS:
            x = boundary_mix(gen, dtype, 700).to(source)
            if source == torch.float64:  # bits below float32's resolution, where one rounding matters
                x = x + x * torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2.0 ** -30
            for scaling in ("none", "amax"):
                got = run(isa, x, dtype=dtype, scaling=scaling)
                want = reference(x, **attrs(dtype, scaling=scaling))
                verdict = judge(SPEC, got, want, Sample(args=(x,), attrs=attrs(dtype, scaling=scaling)))
                assert verdict.ok, (source, dtype, scaling, verdict.reason)


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("dtype", TARGETS, ids=NAMES.get)
def test_every_level_float64_rounds_once(isa, dtype, gen):
    """float64 values a hair off the target's ties (below float32's resolution: a double rounding through
    float32 gets them wrong), past float32's range, subnormal and special, past the parallel grain so the
    chunked float64 path (narrowed to odd float32) and its tails run on every level, both overflow rules."""
    base = boundary_mix(gen, dtype, 700).double()
    hair = base * (torch.rand(base.shape, generator=gen, dtype=torch.float64) - 0.5) * 2.0 ** -28
    f32_max = float(torch.finfo(torch.float32).max)
    extra = torch.tensor([1e39, -1e39, 1e300, -1e300, 3.5e38, 2.0 ** -160, -(2.0 ** -1074), 0.0, -0.0,
                          f32_max * (1 + 2.0 ** -40), -f32_max * (1 + 2.0 ** -40), 2.0 ** 128,  # to 2^128
                          2.0 ** -126 * (1 - 2.0 ** -40), 2.0 ** -130 * (1 + 2.0 ** -35),  # float32 subnormals
                          -(2.0 ** -134) * (1 + 2.0 ** -30), 2.0 ** -134, 3 * 2.0 ** -134],
                         dtype=torch.float64)
    # just past and just short of a tie of the target, by bit 28 (half of float32's last place) or bit 0
    tie = 1 + 2.0 ** -(FORMATS[dtype].man_bits + 1)
    near = torch.tensor([tie + 2.0 ** -24, tie + 2.0 ** -52, tie - 2.0 ** -52], dtype=torch.float64)
    ties = torch.cat([near * s for s in (1.0, -1.0, 2.0 ** -3, -(2.0 ** 5))])
    x = torch.cat([base, base + hair, extra, ties]).repeat(40)[: (1 << 16) + 301]
    for saturate in (False, True):
        for scaling in ("none", "amax"):
            got = run(isa, x, dtype=dtype, saturate=saturate, scaling=scaling)
            want = reference(x, **attrs(dtype, saturate=saturate, scaling=scaling))
            assert_same_bits(got.y, bits(want.y).reshape(-1), x)
            for field in ("scale", "amax", "nonfinite"):
                assert float(getattr(got, field)) == float(getattr(want, field)), (saturate, scaling, field)


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("source", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_every_level_nan_bits_are_the_references(isa, source, gen):
    """A NaN casts to the reference's NaN bits (its sign kept), in the vector loops and their tails alike,
    for every target and both overflow rules: the saturating loops once ORed max finite into it (bfloat16
    0x7FFF, float8_e5m2 0x7F, still NaN but not the reference's, and only in the vector body)."""
    n = 3000 + int(torch.randint(0, 64, (), generator=gen))
    x = (torch.randn(n, generator=gen, dtype=torch.float64) * 4).to(source)
    at = torch.randperm(n, generator=gen)[: n // 20]
    x[at] = float("nan")
    x[at[::2]] = -float("nan")
    x[at[::7]] = float("inf")
    for dtype in TARGETS:
        for saturate in (False, True):
            for scaling in ("none", "amax"):
                got = run(isa, x, dtype=dtype, saturate=saturate, scaling=scaling)
                want = reference(x, **attrs(dtype, saturate=saturate, scaling=scaling))
                diff = bits(got.y).reshape(-1) != bits(want.y).reshape(-1)
                assert not bool(diff.any()), (dtype, saturate, scaling, int(diff.sum()),
                                              hex(int(bits(got.y).reshape(-1)[diff][0])),
                                              hex(int(bits(want.y).reshape(-1)[diff][0])))


@pytest.mark.parametrize("isa", LEVELS)
def test_every_level_stochastic(isa, gen):
    """Stochastic rounding on each level: every element one of the two neighbours, scalars exact, the
    draws reproducible by seed and on average unbiased at the midpoint."""
    for dtype in TARGETS:
        x = boundary_mix(gen, dtype, 2000)
        for saturate, scaling in ((False, "none"), (True, "amax")):
            kw = {"dtype": dtype, "rounding": "stochastic", "saturate": saturate, "scaling": scaling, "seed": 11}
            out = run(isa, x, **kw)
            want = reference(x, **attrs(**kw))
            assert float(out.scale) == float(want.scale) and float(out.amax) == float(want.amax)
            count, example = neighbour_problem(out.y, scaled_values(x, out.scale), FORMATS[dtype], saturate)
            assert count == 0, example
            assert torch.equal(bits(run(isa, x, **kw).y), bits(out.y))
    fmt = FORMATS[torch.bfloat16]
    mid = torch.full((20000,), 1.0 + 2.0 ** -fmt.man_bits / 2)  # halfway between 1 and the next bfloat16
    up = float((run(isa, mid, dtype=torch.bfloat16, rounding="stochastic", seed=5).y.float() > 1).float().mean())
    assert abs(up - 0.5) < 0.03  # 20000 draws: 4 standard deviations is 0.014


def test_levels_agree_on_random_bits(gen):
    """Every level gives the same bits on random float32 patterns (the whole range) for every target."""
    x = wide_random(gen, 1 << 14)
    for dtype in TARGETS:
        for scaling in ("none", "amax"):
            ys = [bits(run(isa, x, dtype=dtype, scaling=scaling).y) for isa in LEVELS]
            for isa, y in zip(LEVELS, ys):
                nan = torch.isnan(run(isa, x, dtype=dtype, scaling=scaling).y.double())
                assert torch.equal(y[~nan], ys[0][~nan]), (isa, dtype, scaling)


def test_out_variant_and_flags(gen):
    """The ``_out`` op writes into a given tensor with the same bits, and rejects a wrong one."""
    lib = _build.library(OP)
    x = boundary_mix(gen, torch.bfloat16, 500)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    flags = cpu_flags(torch.bfloat16, "nearest", "amax", True, 2)
    y, scale, amax, nonfinite = lib.precision_cast_cpu_out(x, flags, 0, out)
    assert y.data_ptr() == out.data_ptr()
    want = reference(x, **attrs(torch.bfloat16, scaling="amax", saturate=True, margin=2))
    assert_same_bits(out, bits(want.y).reshape(-1), x)
    assert float(scale) == float(want.scale)
    with pytest.raises(RuntimeError, match="out must be"):
        lib.precision_cast_cpu_out(x, flags, 0, torch.empty(x.shape, dtype=torch.float16))


# -- torch-cast: the peer as a candidate ------------------------------------------------------------

def test_torch_cast_overflow_rules_probe():
    """The probe finds torch's overflow rule per target; torch-cast serves exactly the matching keys."""
    for source in CAST_SOURCES:
        for dtype in TARGETS:
            rule = cast_saturates("cpu", source, dtype)
            x = torch.ones(4, dtype=source)
            for saturate in (False, True):
                reasons = _cast_check(x, **attrs(dtype, saturate=saturate))
                assert (reasons == []) == (rule is not None and rule == saturate), (source, dtype, saturate, reasons)
    assert _cast_check(torch.ones(3, dtype=torch.float64), **attrs(torch.float16))
    assert _cast_check(torch.ones(3), **attrs(torch.float16, rounding="stochastic"))


@pytest.mark.parametrize("dtype", TARGETS, ids=NAMES.get)
def test_torch_cast_bit_exact_where_it_serves(dtype, gen):
    for source in CAST_SOURCES:
        for saturate in (False, True):
            for scaling in ("none", "amax"):
                x = boundary_mix(gen, dtype, 4000).to(source)
                a = attrs(dtype, saturate=saturate, scaling=scaling, margin=1 if scaling == "amax" else 0)
                if _cast_check(x, **a):
                    continue
                got, want = cast(x, **a), reference(x, **a)
                verdict = judge(SPEC, got, want, Sample(args=(x,), attrs=a))
                assert verdict.ok, (source, saturate, scaling, verdict.reason)
                assert got.scale.dtype == torch.float32 and got.amax.dtype == torch.float32
                assert got.nonfinite.dtype == torch.int64 and got.y.dtype == dtype
    finite = torch.randn(3000, generator=gen)  # the all-finite path (one reduction, no count)
    got = cast(finite, **attrs(dtype, scaling="amax", saturate=dtype == torch.float8_e4m3fn))
    want = reference(finite, **attrs(dtype, scaling="amax", saturate=dtype == torch.float8_e4m3fn))
    assert torch.equal(bits(got.y), bits(want.y)) and float(got.scale) == float(want.scale)
    assert int(got.nonfinite) == 0 and float(got.amax) == float(finite.abs().max())


def test_torch_cast_edges(gen):
    empty = cast(torch.empty(0, 3), **attrs(torch.float16, scaling="amax"))
    assert empty.y.shape == (0, 3) and float(empty.amax) == 0.0 and float(empty.scale) == 1.0
    x = torch.randn(5, dtype=torch.float16, requires_grad=True)
    same = cast(x, **attrs(torch.float16))
    assert not same.y.requires_grad and same.y.data_ptr() != x.data_ptr()  # never the input itself
    huge = torch.tensor([3e38, -1.0, math.nan])  # 448 / 3e38 is a float32 subnormal-free quotient
    got, want = cast(huge, **attrs(torch.float16, scaling="amax")), reference(huge, **attrs(torch.float16, scaling="amax"))
    assert float(got.scale) == float(want.scale) and int(got.nonfinite) == 1


def test_dispatcher_can_serve_with_torch_cast(gen):
    x = torch.randn(1000, generator=gen)
    with dispatcher.use_backend("torch-cast"):
        out = dispatcher.precision_cast(x, dtype=torch.float16)
    assert torch.equal(out.y, x.to(torch.float16))
    with dispatcher.use_backend("torch-cast"), pytest.raises(Exception, match="stochastic"):
        dispatcher.precision_cast(x, dtype=torch.float16, rounding="stochastic")


@pytest.mark.parametrize("case", conformance_cases("torch-cast", ops=[OP]), ids=str)
def test_torch_cast_conforms(case):
    """The conformance kit over torch-cast: the cases it serves pass, the others it declines."""
    check_case(case)
