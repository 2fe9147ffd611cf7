"""fused-bf16gemm: the fused C++ attention with bfloat16 products, on CPUs that multiply bfloat16 natively
(AMX or AVX512_BF16): on the kernels' own AMX tiles where the build, CPU and OS allow it, else through MKL's
gemm_bf16bf16f32; each test that runs the kernel runs it both ways where both exist. The tile product itself
against float64 on edge shapes; each path the kernel changes (the decode kernel for any number of query
rows, the prefill tiles) against the float64 reference through the spec's compare rule, and its non-finite
rules against the reference, on fresh random inputs."""
from __future__ import annotations

import math

import pytest
import torch

from core import dispatcher
from core.ops.attention import SPEC, make_inputs
from core.tuning import check, expected
from plugins.fused import _build
from plugins.fused import attention as fused
from test_attention_fused import NO_CPP, _reference, _sample
from test_attention_peer import KINDS, _poison, _ref, _same_nonfinite_and_close


def _why_not() -> str | None:
    if NO_CPP is not None:
        return f"the fused C++ kernels cannot be built here: {NO_CPP}"
    if not any(f in _build.cpu_flags() for f in fused.BF16_GEMM_FLAGS):
        return f"this CPU has none of {list(fused.BF16_GEMM_FLAGS)}"
    if not _build.module("attention").attention_has_gemm16():
        return "torch's MKL exports no gemm_bf16bf16f32"
    return None


WHY_NOT = _why_not()
needs_gemm16 = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


@pytest.fixture(params=["amx", "mkl"])
def products(request):
    """The products on the AMX tiles, or through MKL's (the tiles switched off), for the test's duration."""
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)
    mod = _build.module("attention")
    was = mod.attention_use_amx(request.param == "amx")
    try:
        if request.param == "amx" and not mod.attention_gemm16_amx():
            pytest.skip("no AMX tiles in this build, CPU or process")
        if request.param == "mkl" and not mod.attention_has_gemm16():
            pytest.skip("torch's MKL exports no gemm_bf16bf16f32")
        yield request.param
    finally:
        mod.attention_use_amx(was)


# (M, N, K): whole tiles, and every kind of edge: rows, columns and the summed dimension short of a tile,
# odd K (a pair of rows half zero), fewer rows than the tiles take (MKL's then), and several tiles each way
GEMM_SHAPES = [(8, 16, 32), (16, 16, 32), (64, 64, 64), (9, 1, 1), (8, 5, 3), (17, 33, 65), (40, 90, 40),
               (100, 70, 130), (33, 48, 97), (1, 64, 64), (5, 300, 128)]


@pytest.mark.parametrize("trans_b", [True, False], ids=["b-transposed", "b"])
def test_gemm16_matches_float64(gen, products, trans_b):
    """c = alpha * a . op(b) + beta * c against the float64 product of the same bfloat16 values, with a row
    stride wider than a row, for the (alpha, beta) the kernels use (1 or a scale with 0; 1 with 1) and a
    general pair."""
    mod = _build.module("attention")
    for M, N, K in GEMM_SHAPES:
        a = torch.randn(M, K + 3, generator=gen).bfloat16()[:, :K]  # rows strided past their end
        b = torch.randn(*((N, K) if trans_b else (K, N)), generator=gen).bfloat16()
        bt = b.double().T if trans_b else b.double()
        for alpha, beta in ((1.0, 0.0), (0.37, 0.0), (1.0, 1.0), (0.5, -2.0)):
            c0 = torch.randn(M, N, generator=gen)
            c = c0.clone()
            mod.attention_gemm16(a, b, trans_b, alpha, beta, c)
            want = alpha * (a.double() @ bt) + beta * c0.double()
            tol = 1e-5 * (1 + K) ** 0.5 * (a.double().abs() @ bt.abs() + abs(beta) * c0.double().abs())
            err = (c.double() - want).abs()
            assert bool((err <= tol + 1e-6).all()), (M, N, K, alpha, beta, float(err.max()))


# (R, n, D): the fewest and the most query rows, rows short of a tile, D of one and of several 32-column steps,
# one and several pairs of key tiles, and an odd 16-key tile at the end
SCORES_T_SHAPES = [(2, 16, 32), (7, 48, 64), (16, 128, 128), (5, 32, 160), (11, 80, 96)]


def test_decode_scores_on_the_tiles_match_float64(gen):
    """The decode tasks' scores for 2-16 query rows, computed as k . q^T with the key block read in place
    through its row stride (k^T is never packed) and transposed back: against the float64 product."""
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)
    mod = _build.module("attention")
    if not mod.attention_gemm16_amx():
        pytest.skip("no AMX tiles in this build, CPU or process")
    for R, n, D in SCORES_T_SHAPES:
        q = torch.randn(R, D, generator=gen).bfloat16()
        k = torch.randn(n, D + 24, generator=gen).bfloat16()[:, :D]  # rows strided past their end
        for alpha in (1.0, 0.37):
            s = torch.full((R, n), float("nan"))
            mod.attention_scores_t(q, k, alpha, s)
            want = alpha * (q.double() @ k.double().T)
            tol = 1e-5 * (1 + D) ** 0.5 * alpha * (q.double().abs() @ k.double().abs().T)
            err = (s.double() - want).abs()
            assert bool((err <= tol + 1e-6).all()), (R, n, D, alpha, float(err.max()))


# (B, Hq, Hkv, Lq, Lk, D, extra): decode groups of 1-8 rows (which fused serves with its SIMD row loops),
# of 32 rows, split over the threads, and the prefill tiles, causal, masked, with rows that attend nothing,
# head dims that are not a multiple of 32, a Dv unlike D, and GQA.
CASES = {
    "decode-mha-lq1-split": (1, 4, 4, 1, 700, 64, {}),
    "decode-mha-lq5-mask": (2, 2, 2, 5, 300, 64, {"mask": "random"}),
    "decode-gqa4-lq8-causal": (1, 8, 2, 8, 200, 128, {"causal": True}),
    "decode-gqa8-lq4-causal-split": (1, 8, 1, 4, 600, 48, {"causal": True}),
    "decode-lq-gt-lk-causal": (1, 4, 2, 7, 5, 16, {"causal": True}),
    "prefill-causal": (1, 4, 2, 70, 70, 64, {"causal": True}),
    "prefill-mask-dv": (2, 2, 1, 40, 90, 40, {"mask": "random", "Dv": 24}),
    "prefill-lq-gt-lk": (1, 2, 2, 50, 20, 32, {"causal": True}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_gemm_meets_the_compare_rule(gen, products, name):
    B, Hq, Hkv, Lq, Lk, D, extra = CASES[name]
    mod = _build.module("attention")
    assert mod.attention_path(B, Hq, Hkv, Lq, Lk, D, extra.get("Dv", D), False) != 0  # not the small rows: a product path
    for return_lse in (False, True):
        sample = _sample(gen, torch.bfloat16, B, Hq, Hkv, Lq, Lk, D, return_lse=return_lse, **extra)
        verdict = check(SPEC, fused.bf16_gemm, expected(SPEC, _reference(), sample, False, gen))
        assert verdict.ok, verdict.reason
        bound = fused.bind_bf16_gemm(**sample.attrs)
        verdict = check(SPEC, lambda q, k, v, **_: bound(q, k, v), expected(SPEC, _reference(), sample, False, gen))
        assert verdict.ok, verdict.reason


@pytest.mark.parametrize("shape", [(2, 8, 4, 3, 300, 64), (1, 16, 2, 2, 200, 128), (2, 4, 4, 8, 130, 96)],
                         ids=["gqa2-lq3", "gqa8-lq2", "mha-lq8"])
def test_bf16_gemm_decode_reads_strided_keys_and_values(gen, products, shape):
    """Decode groups of 2-16 rows, whose scores read each key block in place, on k and v laid out
    [B, L, H, D] and seen as [B, H, L, D] (as a model's projections give them): row strides of H * D,
    whole key tiles and a short last block, against the float64 reference through the compare rule."""
    B, Hq, Hkv, Lq, Lk, D = shape
    sample = _sample(gen, torch.bfloat16, B, Hq, Hkv, Lq, Lk, D, causal=True)
    q, k, v = sample.args
    k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    assert k.stride(2) == Hkv * D
    strided = type(sample)(args=(q, k, v), attrs=sample.attrs)
    verdict = check(SPEC, fused.bf16_gemm, expected(SPEC, _reference(), strided, False, gen))
    assert verdict.ok, verdict.reason


def test_bf16_gemm_differs_from_fused_only_by_its_products(gen, products):
    """Not the same bits as fused (the weights are rounded to bfloat16 for their product with v), but
    within a few bfloat16 units of it: a wrong product (a transposed operand, a stale block) would be far."""
    q, k, v = make_inputs(gen, "cpu", torch.bfloat16, 2, 8, 2, 8, 300, 64)
    kw = {"causal": True, "scale": 0.125, "attn_mask": None, "return_lse": False}
    got, want = fused.bf16_gemm(q, k, v, **kw).float(), fused.attention(q, k, v, **kw).float()
    assert not torch.equal(got, want)
    assert torch.allclose(got, want, atol=2e-2, rtol=2 ** -6)


@pytest.mark.parametrize("shape", [(1, 4, 2, 8, 200, 64, True), (1, 2, 2, 1, 300, 32, False),
                                   (1, 2, 1, 40, 40, 32, True), (1, 2, 2, 64, 96, 64, True)],
                         ids=["decode-gqa", "decode-lq1", "prefill", "prefill-whole-tiles"])
def test_bf16_gemm_follows_the_reference_on_nonfinite_inputs(gen, products, shape):
    B, Hq, Hkv, Lq, Lk, D, causal = shape
    for kind in KINDS:
        q, k, v = make_inputs(gen, "cpu", torch.bfloat16, B, Hq, Hkv, Lq, Lk, D)
        _poison(kind, q, k, v)
        got = fused.bf16_gemm(q, k, v, causal=causal, scale=1 / math.sqrt(D), attn_mask=None, return_lse=False)
        _same_nonfinite_and_close(got, _ref(q, k, v, causal).to(torch.bfloat16), 2e-2, 2 ** -6)


@needs_gemm16
def test_dispatch_can_serve_bf16_gemm(gen):
    q, k, v = make_inputs(gen, "cpu", torch.bfloat16, 1, 8, 2, 8, 300, 64)
    with dispatcher.use_backend("fused-bf16gemm"):
        got = dispatcher.attention(q, k, v, causal=True)
    want = _ref(q, k, v, True)
    assert torch.allclose(got.double(), want, atol=2e-2, rtol=2 ** -6)


def test_bf16_gemm_declines_what_it_would_not_change(gen, monkeypatch):
    """bfloat16 only (its dtypes); calls small enough for the row path, CPUs without native bfloat16
    products, and MKL held below AVX-512 get a reason rather than a second timing of fused."""
    kernel = next(k for k in fused.KERNELS if k.backend == "fused-bf16gemm")
    assert set(kernel.dtypes) == {torch.bfloat16} and not kernel.differentiable
    if NO_CPP is not None:
        pytest.skip(f"the fused C++ kernels cannot be built here: {NO_CPP}")
    kw = {"causal": False, "scale": 0.3, "attn_mask": None, "return_lse": False}
    tiny = make_inputs(gen, "cpu", torch.bfloat16, 1, 1, 1, 4, 8, 8)
    assert any("small" in r for r in fused._bf16_gemm_check(*tiny, **kw)) or WHY_NOT is not None
    big = make_inputs(gen, "cpu", torch.bfloat16, 1, 8, 2, 8, 300, 64)
    monkeypatch.setattr(_build, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert any("amx_bf16" in r for r in fused._bf16_gemm_check(*big, **kw))
    monkeypatch.setattr(_build, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    mod = _build.module("attention")
    was = mod.attention_use_amx(False)  # MKL's products, which the variable holds back
    try:
        assert any("MKL_ENABLE_INSTRUCTIONS" in r for r in fused._bf16_gemm_check(*big, **kw))
        mod.attention_use_amx(True)
        if mod.attention_gemm16_amx():  # the tiles of its own do not depend on MKL's level
            assert not any("MKL_ENABLE_INSTRUCTIONS" in r for r in fused._bf16_gemm_check(*big, **kw))
    finally:
        mod.attention_use_amx(was)


def test_bf16_gemm_reads_keys_changed_in_place(gen, products):
    """The query heads of a GQA group share their packed key and value blocks within a call: a second call
    on the same tensors, changed in place (a cache written between steps), must see the new values."""
    kw = {"causal": True, "scale": 0.125, "attn_mask": None, "return_lse": False}
    for Hkv in (1, 2):  # with one kv head, every task of the next call starts on the blocks a thread packed last
        q, k, v = make_inputs(gen, "cpu", torch.bfloat16, 1 if Hkv == 1 else 2, 8, Hkv, 64, 64, 64)
        for _ in range(3):
            got = fused.bf16_gemm(q, k, v, **kw)
            assert torch.allclose(got.double(), _ref(q, k, v, True), atol=2e-2, rtol=2 ** -6)
            k.copy_(torch.randn(k.shape, generator=gen).bfloat16())
            v.copy_(torch.randn(v.shape, generator=gen).bfloat16())
