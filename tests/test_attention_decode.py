"""The fused attention's split-K decode kernels (C++ on the machine's level and on the AVX2 build, Triton in
the interpreter), and its non-finite rules now that no pass over q, k and v precedes the kernels: each
checked against the float64 reference through the spec's compare rule (forward and gradients), on fresh
random inputs at small sizes that still cross the kernels' splits, tiles and merges."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from core.ops.attention import SPEC, make_inputs, random_mask
from core.spec import Sample
from core.tuning import check, expected
from plugins.fused import _build
from plugins.fused import attention as fused
from test_attention_fused import NO_CPP, NO_TRITON, _check, _reference, _run, _sample

needs_cpp = pytest.mark.skipif(NO_CPP is not None, reason=f"the fused C++ kernels cannot be built here: {NO_CPP}")
needs_triton = pytest.mark.skipif(NO_TRITON is not None, reason=f"{NO_TRITON}")
# The machine's level, and AVX2 beside it where the machine has AVX-512 (conftest builds both).
ISAS = [_build.machine_isa()] + [i for i in ("avx2",) if i in _build.supported_isas() and i != _build.machine_isa()]

# (dtype, B, Hq, Hkv, Lq, Lk, D, extra): splits > 1 need Lk >= 512 at B * Hkv < 4 * threads; groups of fewer
# than 16 query rows per kv head take the SIMD dot/axpy loops (bfloat16 blocks widened once from 8 rows on),
# larger ones the tile products.
DECODE = {
    "mha-lq1": (torch.float32, 2, 3, 3, 1, 300, 64, {}),
    "gqa4-lq3-causal-split": (torch.float32, 1, 8, 2, 3, 700, 32, {"causal": True}),
    "gqa8-lq8-mask-split": (torch.float32, 1, 8, 1, 8, 600, 64, {"mask": "random"}),
    "bf16-gqa4-lq2-causal-split": (torch.bfloat16, 1, 8, 2, 2, 530, 128, {"causal": True}),
    "bf16-gqa2-lq1-split-mask": (torch.bfloat16, 1, 4, 2, 1, 600, 64, {"mask": "random"}),
    "bf16-gqa8-lq2-tiles": (torch.bfloat16, 1, 8, 1, 2, 530, 64, {"causal": True}),
    "lq-gt-lk-causal": (torch.float32, 1, 4, 2, 8, 5, 16, {"causal": True}),
    "d48-dv16-gqa2": (torch.float32, 2, 4, 2, 4, 130, 48, {"Dv": 16}),
    # rows four at a time (AVX-512) or in pairs, with a pair and an odd one left over; a group where some
    # rows attend nothing (Lq > Lk, bottom-right)
    "bf16-mha-lq5-mask-split": (torch.bfloat16, 1, 2, 2, 5, 600, 64, {"mask": "random"}),
    "bf16-mha-lq7-mask-split": (torch.bfloat16, 1, 2, 2, 7, 600, 64, {"mask": "random"}),
    "mha-lq7-d32-causal": (torch.float32, 2, 2, 2, 7, 90, 32, {"causal": True}),
    # three rows a head (AVX-512 takes them as one three-row step), heads of 80 (five AVX-512 vectors),
    # and heads whose splits finish in any order (the last one merges)
    "mha-lq3-d80-split": (torch.float32, 1, 4, 4, 3, 600, 80, {}),
    "bf16-mha-lq3-causal-split": (torch.bfloat16, 2, 3, 3, 3, 1100, 64, {"causal": True}),
    # head widths that are no multiple of the vector (a masked last vector; AVX2 copies a 16-bit one), in
    # the row loops and in the tile products (32 rows), the last key of the tensors among them
    "d72-mha-lq1-split": (torch.float32, 1, 2, 2, 1, 600, 72, {}),
    "bf16-d59-dv33-gqa2-lq3-causal-split": (torch.bfloat16, 1, 4, 2, 3, 600, 59, {"Dv": 33, "causal": True}),
    "f16-d24-mha-lq2-mask": (torch.float16, 2, 2, 2, 2, 300, 24, {"mask": "random"}),
    "d40-gqa8-lq4-tiles": (torch.float32, 1, 8, 1, 4, 300, 40, {"causal": True}),
    "bf16-d20-gqa4-lq5": (torch.bfloat16, 1, 4, 1, 5, 70, 20, {}),
    "gqa2-lq7-gt-lk-causal": (torch.float32, 1, 4, 2, 7, 4, 16, {"causal": True}),
    # float16, widened by F16C in the register (the dot/axpy loops) or a block at a time (the tile products)
    "f16-gqa4-lq2-causal-split": (torch.float16, 1, 8, 2, 2, 530, 128, {"causal": True}),
    "f16-gqa8-lq2-tiles": (torch.float16, 1, 8, 1, 2, 530, 64, {"causal": True}),
    "f16-mha-lq5-mask-split": (torch.float16, 1, 2, 2, 5, 600, 64, {"mask": "random"}),
    # up to 32 query rows under GQA (and, on AVX-512, up to 15 of MHA heads): chunked prefill, speculative
    # verification
    "gqa4-lq16-causal-split": (torch.float32, 1, 8, 2, 16, 600, 64, {"causal": True}),
    "bf16-gqa2-lq24-mask": (torch.bfloat16, 1, 4, 2, 24, 300, 32, {"mask": "random"}),
    "f16-gqa8-lq32-causal-split": (torch.float16, 1, 8, 1, 32, 530, 64, {"causal": True}),
    "mha-lq12-causal-split": (torch.float32, 1, 2, 2, 12, 600, 64, {"causal": True}),
}


def _level(isa):
    return contextlib.nullcontext() if isa == _build.machine_isa() else _build.forced_isa(isa)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", DECODE)
def test_cpp_decode_forward_and_gradients(gen, isa, name):
    dtype, B, Hq, Hkv, Lq, Lk, D, extra = DECODE[name]
    with _level(isa):
        if Lq <= 8 or Hq > Hkv:  # MHA heads of 9-15 rows take it on AVX-512 only
            assert _build.library("attention").attention_takes_decode(Lq, Lk, D, extra.get("Dv", D), Hq // Hkv,
                                                                      dtype == torch.float32)
        _check(fused.CPP, _sample(gen, dtype, B, Hq, Hkv, Lq, Lk, D, **extra), gen)


@needs_cpp
def test_cpp_decode_reads_strided_caches_in_place(gen):
    # A key/value cache is often a view (the first Lk slots of a longer buffer): read through its strides.
    q, k, v = make_inputs(gen, "cpu", torch.bfloat16, 1, 8, 2, 2, 900, 64)
    k, v = k[:, :, :611], v[:, :, :611]
    sample = Sample(args=(q, k, v), attrs={"causal": True, "scale": 0.125, "attn_mask": None, "return_lse": True})
    verdict = check(SPEC, fused.attention, expected(SPEC, _reference(), sample, False, gen))
    assert verdict.ok, verdict.reason


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
def test_cpp_prefill_on_each_level(gen, monkeypatch, isa):
    monkeypatch.setattr(fused, "CPU_FWD_BLOCKS", (24, 40))  # many tiles, the diagonal crossing them
    with _level(isa):
        _check(fused.CPP, _sample(gen, torch.float32, 1, 4, 2, 70, 90, 32, causal=True, mask="random"), gen)
        _check(fused.CPP, _sample(gen, torch.bfloat16, 1, 2, 1, 40, 40, 59, causal=True), gen)


# The prefill tiles' two kinds of products (the file's own register-blocked loops, MKL's sgemm), each forced:
# head dims and key blocks that are not whole vectors, the causal diagonal set in registers, a caller's mask,
# Lq > Lk, bfloat16.
PRODUCTS = {"own": 1, "blas": 2}
PREFILL = {
    "mask-causal-tiles": (torch.float32, 1, 4, 2, 70, 90, 32, {"causal": True, "mask": "random"}, (24, 40)),
    "d59-dv33-causal": (torch.float32, 1, 2, 1, 40, 43, 59, {"Dv": 33, "causal": True}, None),
    "bf16-d24-causal": (torch.bfloat16, 1, 2, 2, 37, 53, 24, {"causal": True}, (16, 24)),
    "f16-d40-mask-causal": (torch.float16, 1, 4, 2, 37, 53, 40, {"causal": True, "mask": "random"}, (16, 24)),
    "lq-gt-lk-causal": (torch.float32, 1, 2, 2, 50, 20, 16, {"causal": True}, None),
    "d16-l40": (torch.float32, 1, 2, 2, 40, 40, 16, {}, None),
    "d128-gqa": (torch.float32, 1, 4, 1, 33, 70, 128, {"causal": True}, None),
}


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("name", PREFILL)
def test_cpp_prefill_products_on_each_level(gen, monkeypatch, isa, products, name):
    dtype, B, Hq, Hkv, Lq, Lk, D, extra, tiles = PREFILL[name]
    if tiles is not None:
        monkeypatch.setattr(fused, "CPU_FWD_BLOCKS", tiles)
    with _level(isa):
        lib = _build.library("attention")
        lib.attention_tile_products(PRODUCTS[products])
        try:
            _check(fused.CPP, _sample(gen, dtype, B, Hq, Hkv, Lq, Lk, D, **extra), gen)
        finally:
            lib.attention_tile_products(0)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("products", PRODUCTS)
def test_cpp_prefill_products_keep_the_nonfinite_rules(gen, isa, products):
    # Keys and values causal hides from the first rows hold NaN and inf: the rows that may not attend them
    # must come out finite and right (their weights 0 even where the product meets NaN), the rows that do
    # attend them NaN as in IEEE arithmetic; and an inf in a query poisons only its own row.
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 2, 2, 40, 40, 16)
    k[:, 0, 30] = float("nan")
    v[:, 1, 33, 5] = float("inf")
    q[:, 1, 7, 3] = float("inf")
    sample = Sample(args=(q, k, v), attrs={"causal": True, "scale": 0.25, "attn_mask": None, "return_lse": True})
    with _level(isa):
        lib = _build.library("attention")
        lib.attention_tile_products(PRODUCTS[products])
        try:
            verdict = check(SPEC, fused.attention, expected(SPEC, _reference(), sample, False, gen))
            o = fused.attention(q, k, v, causal=True, scale=0.25, attn_mask=None, return_lse=False)
        finally:
            lib.attention_tile_products(0)
    assert verdict.ok, verdict.reason
    assert torch.isfinite(o[0, 0, :30]).all() and torch.isnan(o[0, 0, 30:]).all()
    assert torch.isfinite(o[0, 1, :33][torch.arange(33) != 7]).all()


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 9, 12), (1, 4, 2, 20, 45, 16), (1, 8, 2, 3, 300, 64),
                                   (1, 2, 2, 70, 90, 40)], ids=["small", "tiles", "decode", "tiles-d40"])
def test_cpp_eager_16bit_rows_equal_the_float32_call_rounded(gen, isa, dtype, shape):
    # The eager bfloat16 or float16 call reads q, k and v in place (a transposed q included) and rounds each
    # output row where it writes it. Widening is exact, so it must give the float32 call's result rounded by
    # torch's cast, bit for bit, rows recomputed by the exact path (a NaN query, an inf key) included.
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v = make_inputs(gen, "cpu", dtype, B, Hq, Hkv, Lq, Lk, D)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Lq, Hq, D] memory, as a transformers layer has it
    q[0, 1, Lq - 1, 2] = float("nan")
    k[0, 0, 1, 0] = float("inf")
    with _level(isa), torch.no_grad():
        for causal in (False, True):
            got = fused.attention(q, k, v, causal=causal, scale=0.3, attn_mask=None, return_lse=False)
            want = fused.attention(q.float(), k.float(), v.float(), causal=causal, scale=0.3, attn_mask=None,
                                   return_lse=False).to(dtype)
            assert got.dtype == dtype
            nan = torch.isnan(want)
            assert bool(nan.any()) and torch.equal(torch.isnan(got), nan)
            assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
            # and the float32 call itself against the float64 reference, through the spec's compare rule
            sample = Sample(args=(q, k, v), attrs={"causal": causal, "scale": 0.3, "attn_mask": None,
                                                   "return_lse": True})
            verdict = check(SPEC, fused.attention, expected(SPEC, _reference(), sample, False, gen))
            assert verdict.ok, verdict.reason


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2, 1, 5, 9, 12), (2, 4, 2, 40, 70, 16), (2, 4, 2, 3, 300, 64)],
                         ids=["small", "tiles", "decode"])
def test_cpp_reads_broadcast_views(gen, isa, dtype, shape):
    # A view expanded along the sequence (row stride 0) read in place would hand BLAS a leading dimension
    # of 0 (MKL rejects the call and the tile stays unwritten): such inputs are copied first. Views expanded
    # over the batch are still read in place through their strides.
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v = make_inputs(gen, "cpu", dtype, B, Hq, Hkv, Lq, Lk, D)
    inputs = [
        (q[:, :, :1].expand(B, Hq, Lq, D), k, v),  # one query row repeated: stride 0 along Lq
        (q, k[:, :, :1].expand(B, Hkv, Lk, D), v[:, :, :1].expand(B, Hkv, Lk, D)),  # one key and value repeated
        (q, k[:1].expand(B, Hkv, Lk, D), v[:1].expand(B, Hkv, Lk, D)),  # the batch sharing one cache
    ]
    with _level(isa):
        for args in inputs:
            sample = Sample(args=args, attrs={"causal": True, "scale": 0.25, "attn_mask": None, "return_lse": True})
            verdict = check(SPEC, fused.attention, expected(SPEC, _reference(), sample, False, gen))
            assert verdict.ok, verdict.reason


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 9, 12), (1, 4, 2, 20, 45, 16), (2, 4, 2, 3, 300, 64)],
                         ids=["small", "tiles", "decode"])
def test_cpp_eager_reads_every_broadcast_mask_shape(gen, isa, shape):
    # The no-grad call hands the caller's mask to C++ as it is, read through its strides (0 where it
    # broadcasts): each shape must give the reference's answer, and the very bits of the same mask
    # expanded to [B, Hq, Lq, Lk] first (the autograd path's form).
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v = make_inputs(gen, "cpu", torch.float32, B, Hq, Hkv, Lq, Lk, D)

    def rand(*size):
        m = torch.rand(*size, generator=gen) < 0.7
        m[..., 0] = True  # rows that attend nothing are covered elsewhere; here every stride must count
        return m

    masks = {
        "[Lk]": rand(Lk), "[Lq, Lk]": rand(Lq, Lk), "[Hq, Lq, Lk]": rand(Hq, Lq, Lk),
        "[B, 1, Lq, Lk]": rand(B, 1, Lq, Lk), "[B, Hq, 1, Lk]": rand(B, Hq, 1, Lk),
        "[1, Hq, Lq, 1]": rand(1, Hq, Lq, 1) | True, "[B, Hq, Lq, Lk]": rand(B, Hq, Lq, Lk),
        "[Lk, Lq].t()": rand(Lk, Lq).t(), "[B, Hq, Lq, Lk] strided": rand(B, Hq, Lq, 2 * Lk)[..., ::2],
    }
    with _level(isa), torch.no_grad():
        for name, mask in masks.items():
            for causal in (False, True):
                sample = Sample(args=(q, k, v), attrs={"causal": causal, "scale": 0.3, "attn_mask": mask,
                                                       "return_lse": True})
                verdict = check(SPEC, fused.attention, expected(SPEC, _reference(), sample, False, gen))
                assert verdict.ok, f"{name}: {verdict.reason}"
                o, lse = fused.attention(q, k, v, **sample.attrs)
                o4, lse4 = _run(fused.CPP)(q, k, v, **sample.attrs)
                assert torch.equal(o, o4) and torch.equal(lse, lse4), name


# -- non-finite inputs, with no pass over them before the kernels --------------------------------------

def _poison(gen, dtype, B, Hq, Hkv, Lq, Lk, D, where, causal=False):
    """A sample whose inputs hold inf or NaN: at masked keys only (``masked``), or attended (the others)."""
    q, k, v = make_inputs(gen, "cpu", dtype, B, Hq, Hkv, Lq, Lk, D)
    mask = None
    if where == "masked":  # key padding: the last keys masked for every query, garbage in them
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[..., -3:] = False
        k[:, :, -3:] = float("nan")
        v[:, :, -2:] = float("inf")
        v[:, :, -3, 1] = float("nan")
    elif where == "dead-rows":  # rows that attend nothing, NaN in the values they do not attend
        mask = random_mask(gen, (B, Hq, Lq, Lk), "cpu")
        mask[..., 0, :] = False
        v[..., 1, :] = float("nan")
        mask[..., :, 1] = False
    elif where == "v-attended":
        v[:, 0, Lk // 2, 0] = float("nan")
        v[:, -1, 1, :] = float("inf")
    elif where == "k-attended":
        k[:, 0, Lk // 3, 2] = float("inf")
        k[:, -1, 0, :] = -float("inf")
    elif where == "q-nan":
        q[:, 0, Lq // 2, 3] = float("nan")
    attrs = {"causal": causal, "scale": 1.0 / math.sqrt(D), "attn_mask": mask, "return_lse": True}
    return Sample(args=(q, k, v), attrs=attrs)


SHAPES = {  # (B, Hq, Hkv, Lq, Lk, D): decode (split over the keys), prefill (tiles of 16 x 32), and a call
    # small enough for the C++ row-by-row path (D not a multiple of any vector width)
    "decode": (1, 4, 2, 3, 600, 32),
    "decode-3-rows": (1, 2, 2, 3, 600, 32),  # MHA: each head's three rows in one step on AVX-512
    "decode-d40": (1, 4, 2, 2, 600, 40),  # a partial last vector
    "prefill": (1, 4, 2, 20, 45, 16),
    "small": (2, 4, 2, 5, 9, 12),
}
PLACES = ("masked", "dead-rows", "v-attended", "k-attended", "q-nan")


def _entry(path):
    return fused.attention if path == "CPP" else _run(fused.TRITON)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", [pytest.param("CPP", marks=needs_cpp), pytest.param("TRITON", marks=needs_triton)])
def test_nonfinite_inputs_follow_the_contract(gen, monkeypatch, path, shape, place):
    monkeypatch.setattr(fused, "CPU_FWD_BLOCKS", (16, 32))
    B, Hq, Hkv, Lq, Lk, D = SHAPES[shape]
    if path == "TRITON":
        Lk = min(Lk, 100)  # the interpreter is slow; 100 keys still make two splits
    sample = _poison(gen, torch.float32, B, Hq, Hkv, Lq, Lk, D, place, causal=shape == "prefill")
    # Gradients are checked where the poison has no influence (the attended NaN's are NaN by IEEE rules).
    grads = place in ("masked", "dead-rows")
    verdict = check(SPEC, _entry(path), expected(SPEC, _reference(), sample, grads, gen))
    assert verdict.ok, verdict.reason
    if grads:
        inputs = [t.clone().requires_grad_(True) for t in sample.args]
        o, _ = _entry(path)(*inputs, **sample.attrs)
        o.sum().backward()
        assert torch.isfinite(o).all() and all(torch.isfinite(t.grad).all() for t in inputs)


@needs_cpp
@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU has no level above AVX2 to test AVX2 beside")
@pytest.mark.parametrize("place", ("masked", "v-attended", "q-nan"))
def test_nonfinite_on_the_avx2_build(gen, place):
    with _build.forced_isa("avx2"):
        for shape in SHAPES.values():
            sample = _poison(gen, torch.float32, *shape, place)
            verdict = check(SPEC, fused.attention, expected(SPEC, _reference(), sample, False, gen))
            assert verdict.ok, verdict.reason


@needs_cpp
def test_cpp_finite_inputs_take_no_pass_before_the_kernel(gen, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a pass over the inputs before the kernel")

    monkeypatch.setattr(torch, "isfinite", boom)
    monkeypatch.setattr(torch, "nan_to_num", boom)
    for Lq, Lk in ((1, 300), (40, 40)):
        q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 4, 2, Lq, Lk, 32)
        fused.attention(q, k, v, causal=True, scale=0.2, attn_mask=None, return_lse=True)


# -- Triton decode (interpreter) -------------------------------------------------------------------------

TRITON_DECODE = {  # small enough for the interpreter; Lk = 100 makes two splits of 64 keys
    "gqa4-lq5-causal": (torch.float32, 1, 8, 2, 5, 100, 32, {"causal": True}),
    "mqa16-lq5-two-row-blocks": (torch.float32, 1, 16, 1, 5, 70, 16, {}),
    "mha-lq1-mask": (torch.float32, 2, 2, 2, 1, 100, 16, {"mask": "random"}),
    "bf16-gqa2-lq2": (torch.bfloat16, 1, 4, 2, 2, 90, 64, {"causal": True}),
    "lq-gt-lk-causal": (torch.float32, 1, 2, 1, 6, 4, 16, {"causal": True}),
}


@needs_triton
@pytest.mark.parametrize("name", TRITON_DECODE)
def test_triton_decode_forward_and_gradients(gen, name):
    dtype, B, Hq, Hkv, Lq, Lk, D, extra = TRITON_DECODE[name]
    _check(fused.TRITON, _sample(gen, dtype, B, Hq, Hkv, Lq, Lk, D, **extra), gen)


@needs_triton
@pytest.mark.parametrize("Lq", (2, 20))
def test_triton_forward_never_reads_a_device_value_on_the_host(gen, monkeypatch, Lq):
    # On CUDA, bool(t) or t.item() is a host synchronization; the forward (decode and tiles, flags and
    # exact-row pass included, non-finite inputs too) must need none.
    sample = _poison(gen, torch.float32, 1, 4, 2, Lq, 40, 16, "v-attended", causal=True)

    def sync(*args, **kwargs):
        raise AssertionError("a host synchronization in the Triton forward")

    exp = expected(SPEC, _reference(), sample, False, gen)
    with monkeypatch.context() as patch:
        for name in ("__bool__", "item", "tolist", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, sync)
        with torch.no_grad():
            out = fused.attend(fused.TRITON, *sample.args, **sample.attrs)
    assert SPEC.compare(out, exp.ref, sample).ok


_THREADS_PROGRAM = """
import torch
from core.ops.attention import make_inputs
from plugins.fused import attention as fused
gen = torch.Generator().manual_seed(0)
seen = [torch.get_num_threads()]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for B, Hq, Hkv, Lq, Lk, D in ((1, 16, 16, 8, 128, 64), (1, 8, 2, 20, 300, 64), (2, 4, 4, 64, 64, 32)):
        q, k, v = make_inputs(gen, "cpu", dtype, B, Hq, Hkv, Lq, Lk, D)
        with torch.no_grad():
            fused.attention(q, k, v, causal=True, scale=0.125, attn_mask=None, return_lse=False)
        seen.append(torch.get_num_threads())
        q, k, v = (t.float().requires_grad_(True) for t in (q, k, v))
        fused.attention(q, k, v, causal=True, scale=0.125, attn_mask=None, return_lse=False).sum().backward()
        seen.append(torch.get_num_threads())
print(seen)
"""


@needs_cpp
def test_cpp_calls_leave_the_callers_thread_count_alone():
    """A bfloat16 decode call (its query widened by an at::parallel_for while MKL was held to one thread)
    left the calling thread's OpenMP count at 1 in a program that never set it: torch.get_num_threads()
    said 1 and every later op ran on one core. A fresh process, as a user's program starts: forward and
    backward, each path (decode rows, decode tiles, prefill), each 16/32-bit dtype."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _THREADS_PROGRAM], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    seen = [int(n) for n in out.stdout.strip().splitlines()[-1].strip("[]").split(",")]
    assert len(seen) == 19 and len(set(seen)) == 1, seen


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("Lq,mask", [(5, "causal"), (8, "random"), (4, None)])
def test_narrow_float32_mha_heads_take_the_prefill_tiles_from_four_rows(gen, isa, Lq, mask):
    """Float32 MHA heads of up to 16 dims with 4-8 query rows leave the decode rows for the prefill tiles
    (a score there is one multiply-add vector; the rows' horizontal sums cost more). 16-bit heads, three
    rows, GQA groups and wider heads keep the decode kernel. The rerouted calls against the float64
    reference, with the causal diagonal or a random mask on a split-length cache."""
    with _level(isa):
        takes = _build.library("attention").attention_takes_decode
        assert not takes(Lq, 600, 16, 16, 1, True) and not takes(Lq, 600, 12, 12, 1, True)
        assert takes(Lq, 600, 16, 16, 1, False) and takes(3, 600, 16, 16, 1, True)
        assert takes(Lq, 600, 16, 16, 2, True) and takes(Lq, 600, 24, 24, 1, True) and takes(Lq, 600, 16, 32, 1, True)
        extra = {"causal": True} if mask == "causal" else {"mask": mask} if mask else {}
        _check(fused.CPP, _sample(gen, torch.float32, 2, 3, 3, Lq, 600, 16, **extra), gen)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype,D,Dv,extra", [
    (torch.float32, 24, 24, {"causal": True}), (torch.float32, 72, 40, {"mask": "random"}),
    (torch.bfloat16, 40, 33, {"causal": True}), (torch.float32, 16, 20, {})])
def test_prefill_tiles_take_the_values_last_partial_vector_masked(gen, monkeypatch, isa, dtype, D, Dv, extra):
    """The prefill tiles' value product on value widths that are no multiple of the vector (AVX-512: 24,
    40, 72 end in 8 lanes; AVX2: 33 and 20 end in 1 and 4): the last vector loads and stores only its
    lanes, so the next row's accumulators are untouched. Small tiles, so rows and key blocks are many."""
    monkeypatch.setattr(fused, "CPU_FWD_BLOCKS", (16, 32))
    with _level(isa):
        assert _build.module("attention").attention_path(2, 4, 2, 70, 90, D, Dv, dtype == torch.float32) == 2
        _check(fused.CPP, _sample(gen, dtype, 2, 4, 2, 70, 90, D, Dv=Dv, **extra), gen)


@needs_cpp
@pytest.mark.parametrize("isa", ISAS)
def test_wide_decode_takes_only_calls_with_many_more_keys_than_rows(isa):
    """Up to 32 query rows under GQA take the decode kernel only where the keys outnumber them four times:
    a short square prefill (L = 16) is one small block per task there, and the tiles beat it."""
    with _level(isa):
        takes = _build.library("attention").attention_takes_decode
        for f32 in (True, False):
            assert takes(16, 600, 64, 64, 4, f32) and takes(32, 128, 64, 64, 8, f32) and takes(8, 8, 64, 64, 4, f32)
            assert not takes(16, 16, 64, 64, 4, f32) and not takes(32, 127, 64, 64, 8, f32)
            assert not takes(33, 4096, 64, 64, 8, f32)
