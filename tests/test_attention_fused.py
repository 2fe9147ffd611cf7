"""The fused attention kernels: C++ on the CPU through the conformance kit and the dispatcher, and the
Triton kernels run by the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest) at
small sizes that still cover the odd ones. Correctness only; speed is scripts/bench_attention.py's
business (CPU) and gpu_check's (CUDA)."""
from __future__ import annotations

import math
import types

import pytest
import torch

from core import dispatcher
from core.ops.attention import SPEC, make_inputs, random_mask
from core.spec import Sample
from core.tuning import check, expected
from plugins.fused import _build
from plugins.fused import attention as fused
from plugins.torch_backend.attention import attention as torch_attention
from registry.conformance import conformance_cases, run_case
from registry.loader import get_registry

NO_CPP = _build.unavailable_reason("attention")
NO_TRITON = _build.triton_reason()
needs_cpp = pytest.mark.skipif(NO_CPP is not None, reason=f"the fused C++ kernels cannot be built here: {NO_CPP}")
PATHS = [pytest.param("CPP", marks=needs_cpp),
         pytest.param("TRITON", marks=pytest.mark.skipif(NO_TRITON is not None, reason=f"{NO_TRITON}"))]

# Cases the fused kernel declines on the CPU, with the words its reason must contain.
DECLINED_ON_CPU = {"float64": "dtype float64"}


def _reference():
    return get_registry().reference("attention")


def _sample(gen, dtype, B, Hq, Hkv, Lq, Lk, D, *, Dv=None, causal=False, mask=None, return_lse=True):
    q, k, v = make_inputs(gen, "cpu", dtype, B, Hq, Hkv, Lq, Lk, D, Dv)
    if mask == "random":
        mask = random_mask(gen, (B, Hq, Lq, Lk), "cpu")  # with one row that may attend nothing
    attrs = {"causal": causal, "scale": 1.0 / math.sqrt(D), "attn_mask": mask, "return_lse": return_lse}
    return Sample(args=(q, k, v), attrs=attrs)


def _run(path):
    """The kernel's calling convention on one path (CPP or TRITON), whatever the tensors' device."""
    def fn(q, k, v, *, causal, scale, attn_mask, return_lse):
        o, lse = fused.FusedAttention.apply(q, k, v, causal, scale, attn_mask, path)
        return (o, lse) if return_lse else o
    return fn


def _check(path, sample, gen):
    """Forward and gradients through the spec's compare rule, as the tuner validates them."""
    verdict = check(SPEC, _run(path), expected(SPEC, _reference(), sample, True, gen))
    assert verdict.ok, verdict.reason


# -- the C++ kernels -------------------------------------------------------------------------------

EDGE = [c for c in conformance_cases("fused", ops=["attention"]) if c.case in SPEC.edge_cases]


@needs_cpp
@pytest.mark.parametrize("case", EDGE, ids=str)
def test_cpp_conforms_on_every_edge_case(case):
    result = run_case(case)
    if case.case in DECLINED_ON_CPU:
        assert result.status == "unsupported" and DECLINED_ON_CPU[case.case] in result.reason, result
        return
    assert result.status == "ok", result.reason


@needs_cpp
@pytest.mark.parametrize("case", sorted(SPEC.cases))
def test_cpp_on_the_specs_cases_shrunk(gen, case):
    # Shrunk as the tuner validates them: the float64 reference at full size takes most of a minute.
    sample = SPEC.cases[case](gen, "cpu")
    _check(fused.CPP, SPEC.shrink(sample.args, sample.attrs, gen), gen)


SHAPES = {  # (dtype, B, Hq, Hkv, Lq, Lk, D, extra)
    "odd-lengths-causal": (torch.float32, 1, 2, 2, 113, 203, 64, {"causal": True}),
    "d59-dv33": (torch.float32, 1, 2, 1, 40, 70, 59, {"Dv": 33}),
    "lq-gt-lk-causal": (torch.float32, 1, 4, 2, 150, 70, 32, {"causal": True}),
    "lq1-causal": (torch.float32, 2, 4, 1, 1, 700, 64, {"causal": True}),
    "gqa-mask": (torch.float32, 2, 6, 2, 70, 90, 16, {"mask": "random"}),
    "mask-and-causal": (torch.float32, 1, 2, 2, 65, 65, 16, {"mask": "random", "causal": True}),
    "bfloat16-causal": (torch.bfloat16, 1, 4, 2, 130, 130, 64, {"causal": True}),
    "float16-gqa-mask-causal": (torch.float16, 1, 4, 2, 70, 90, 40, {"causal": True, "mask": "random"}),
}


# (forward, backward) tiles: the defaults (one key tile at these lengths) and small, odd ones (many tiles,
# partial tiles at both ends, the causal diagonal crossing tiles at every offset).
TILES = {"default": None, "small": ((16, 32), (16, 32)), "odd": ((24, 40), (40, 24))}


@needs_cpp
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("name", SHAPES)
def test_cpp_forward_and_gradients_across_tile_edges(gen, monkeypatch, name, tiles):
    if TILES[tiles] is not None:
        monkeypatch.setattr(fused, "CPU_FWD_BLOCKS", TILES[tiles][0])
        monkeypatch.setattr(fused, "CPU_BWD_BLOCKS", TILES[tiles][1])
    dtype, B, Hq, Hkv, Lq, Lk, D, extra = SHAPES[name]
    _check(fused.CPP, _sample(gen, dtype, B, Hq, Hkv, Lq, Lk, D, **extra), gen)


@needs_cpp
def test_cpp_fallback_loop_matches_reference(gen):
    lib = _build.library("attention")
    lib.attention_use_blas(False)
    try:
        _check(fused.CPP, _sample(gen, torch.float32, 1, 4, 2, 70, 90, 24, causal=True, mask="random"), gen)
    finally:
        lib.attention_use_blas(True)


@pytest.mark.parametrize("path", PATHS)
def test_gradient_through_lse(gen, path):
    q, k, v = make_inputs(gen, "cpu", torch.float64, 1, 2, 1, 20, 30, 16)
    go = torch.randn(1, 2, 20, 16, generator=gen, dtype=torch.float64)
    gl = torch.randn(1, 2, 20, generator=gen, dtype=torch.float64)

    def grads(run, dtype):
        inputs = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        o, lse = run(*inputs, causal=True, scale=0.25, attn_mask=None, return_lse=True)
        loss = (o.double() * go).sum() + (lse.double() * gl).sum()
        return torch.autograd.grad(loss, inputs)

    want = grads(torch_attention, torch.float64)
    got = grads(_run(getattr(fused, path)), torch.float32)
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w, atol=2e-5), (g.double() - w).abs().max()


def _entry(path):
    """How a caller reaches a path: the kernel function for the C++ one (which looks at k and v first),
    the autograd Function for Triton on CPU tensors (its kernels read non-finite values as 0)."""
    if path == "CPP":
        return fused.attention
    return _run(fused.TRITON)


@pytest.mark.parametrize("path", PATHS)
def test_nonfinite_at_masked_positions_reaches_neither_output_nor_gradients(gen, path):
    sample = _sample(gen, torch.float32, 1, 2, 2, 16, 24, 16, causal=True)
    q, k, v = sample.args
    mask = torch.ones(1, 1, 1, 24, dtype=torch.bool)
    mask[..., -4:] = False
    k[:, :, -4:] = float("nan")
    v[:, :, -4:] = float("inf")
    sample = Sample(args=(q, k, v), attrs={**sample.attrs, "attn_mask": mask})
    verdict = check(SPEC, _entry(path), expected(SPEC, _reference(), sample, True, gen))
    assert verdict.ok, verdict.reason
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o, lse = _entry(path)(*inputs, **sample.attrs)
    o.sum().backward()
    assert torch.isfinite(o).all() and all(torch.isfinite(t.grad).all() for t in inputs)


@needs_cpp
def test_masked_nonfinite_keys_still_take_the_tiled_kernel(gen, monkeypatch):
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 4, 2, 8, 12, 16)
    mask = torch.ones(1, 4, 8, 12, dtype=torch.bool)
    mask[:, 2:, :, 5] = False  # key 5 of kv head 1 is attended by neither of its query heads
    v[0, 1, 5, 3] = float("nan")
    monkeypatch.setattr(fused, "torch_attention", None)  # the dense fallback must not be needed
    o = fused.attention(q, k, v, causal=False, scale=0.25, attn_mask=mask, return_lse=False)
    want = _reference().fn(q, k, v, causal=False, scale=0.25, attn_mask=mask, return_lse=False)
    assert torch.isfinite(o).all() and torch.allclose(o, want, atol=1e-5)


@needs_cpp
def test_empty_sequences(gen):
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 2, 2, 5, 0, 8)
    o, lse = fused.attention(q, k, v, causal=False, scale=0.3, attn_mask=None, return_lse=True)
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 2, 2, 0, 6, 8)
    assert fused.attention(q, k, v, causal=True, scale=0.3, attn_mask=None, return_lse=False).shape == (1, 2, 0, 8)


# -- dispatch ------------------------------------------------------------------------------------

@needs_cpp
def test_dispatcher_runs_fused_and_the_tuner_considers_it(gen):
    sample = _sample(gen, torch.float32, 1, 4, 2, 48, 48, 16, causal=True, return_lse=False)
    q, k, v = sample.args
    with dispatcher.use_backend("fused"):
        out = dispatcher.attention(q, k, v, causal=True)
    want = _reference().fn(q.double(), k.double(), v.double(), causal=True, scale=0.25, attn_mask=None, return_lse=False)
    assert torch.allclose(out.double(), want, atol=1e-5)
    explanation = dispatcher.explain("attention", q, k, v, causal=True)
    row = next(r for r in explanation.rows if r.backend == "fused")
    assert row.status in ("chosen", "ok"), row
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    grad_row = next(r for r in dispatcher.explain("attention", *inputs, causal=True).rows if r.backend == "fused")
    assert grad_row.status in ("chosen", "ok"), grad_row


def _stub(device, dtype, D=64, Dv=64):
    return (types.SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(1, 2, 8, D)),
            types.SimpleNamespace(shape=(1, 2, 8, D)), types.SimpleNamespace(shape=(1, 2, 8, Dv)))


def test_check_gives_reasons_per_device(monkeypatch):
    kw = {"causal": False, "scale": 0.1, "attn_mask": None, "return_lse": False}
    assert fused._check(*_stub("cpu", torch.float32), **kw) == ([] if NO_CPP is None else [NO_CPP])
    assert fused._check(*_stub("cpu", torch.float16), **kw) == ([] if NO_CPP is None else [NO_CPP])
    assert "dtype float64 on the CPU" in fused._check(*_stub("cpu", torch.float64), **kw)[0]
    assert fused._check(*_stub("cuda", torch.bfloat16), **kw) == ([] if NO_TRITON is None else [NO_TRITON])
    assert "dtype float64 on CUDA" in fused._check(*_stub("cuda", torch.float64), **kw)[0]
    assert "head dim 320 on CUDA" in fused._check(*_stub("cuda", torch.float16, Dv=320), **kw)[0]
    monkeypatch.setenv(_build.ENV_DISABLE, "1")
    assert any(_build.ENV_DISABLE in r for r in fused._check(*_stub("cpu", torch.float32), **kw))


@needs_cpp
@pytest.mark.parametrize("shape", [(1, 2, 5, 9, 12), (1, 4, 20, 45, 16), (2, 8, 3, 300, 64)])  # small, tiles, decode
def test_eager_bfloat16_call_rounds_as_torch_does(gen, shape):
    # the eager CPU call widens bfloat16 inputs and rounds its float32 result in C++, not through .to()
    B, H, Lq, Lk, D = shape
    q, k, v = make_inputs(gen, "cpu", torch.bfloat16, B, H, H, Lq, Lk, D)
    k[0, 0, 1, 0] = float("nan")  # one NaN row of the result, through the exact path
    with torch.no_grad():
        got = fused.attention(q, k, v, causal=False, scale=0.3, attn_mask=None, return_lse=False)
        o, _, _ = _build.library("attention").attention_fwd(q.float(), k.float(), v.float(), None, False, 0.3,
                                                            *fused.CPU_FWD_BLOCKS)
    assert got.dtype == torch.bfloat16
    want = o.to(torch.bfloat16)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(got).any())
    assert torch.equal(got.view(torch.int16)[~torch.isnan(got)], want.view(torch.int16)[~torch.isnan(want)])


@needs_cpp
@pytest.mark.parametrize("strided", [False, True])
def test_cpp_bfloat16_tiles_read_keys_and_values_in_place(gen, strided):
    # above the small-call size: the tiles widen each bfloat16 key and value block inside their task,
    # reading k and v through their strides (a transposed view's rows included)
    sample = _sample(gen, torch.bfloat16, 1, 4, 2, 24, 70, 40, causal=True, mask="random")
    q, k, v = sample.args
    if strided:
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
        assert not k.is_contiguous() and k.stride(3) == 1
    _check(fused.CPP, Sample(args=(q, k, v), attrs=sample.attrs), gen)
    o = fused.attention(q, k, v, **{**sample.attrs, "return_lse": False})
    want = fused.attention(q.float(), k.float(), v.float(), **{**sample.attrs, "return_lse": False})
    assert torch.equal(o, want.to(torch.bfloat16))  # widening is exact: the same float32 tiles


# -- fused-sdpa: SDPA behind the C++ finite check ----------------------------------------------------------

SDPA_CASES = [c for c in conformance_cases("fused-sdpa", ops=["attention"])]


@needs_cpp
@pytest.mark.parametrize("case", SDPA_CASES, ids=str)
def test_fused_sdpa_conforms(case):
    result = run_case(case)
    if result.status == "unsupported":  # return_lse or an empty sequence: SDPA's own limits, as torch-sdpa's;
        # float64, which it leaves to torch-sdpa
        assert ("log-sum-exp" in result.reason or "empty sequence" in result.reason
                or "dtype float64 is not among its dtypes" in result.reason), result
        return
    assert result.status == "ok", result.reason


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_finite_check_agrees_with_isfinite(gen, dtype):
    """The one-pass check over q, k and v against torch.isfinite: NaN, +inf or -inf at a random place of a
    random one of the three (or nowhere), contiguous, transposed-memory and row-sliced tensors, sizes on
    both sides of its 4096-value blocks."""
    raw = _build.module("attention").attention_all_finite
    seen = {0: 0, 1: 0}
    for trial in range(120):
        shape = [int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen)),
                 int(torch.randint(1, 700, (1,), generator=gen)), int(torch.randint(1, 70, (1,), generator=gen))]
        ts = [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]
        if trial % 3 == 1:
            ts[1] = ts[1].transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, H, D] memory
        if trial % 4 == 2:
            wide = torch.randn(shape[:3] + [shape[3] + 3], generator=gen).to(dtype)
            ts[2] = wide[..., 1 : shape[3] + 1]  # rows of a wider buffer
        if trial % 2:
            which = int(torch.randint(0, 3, (1,), generator=gen))
            at = tuple(int(torch.randint(0, n, (1,), generator=gen)) for n in shape)
            ts[which][at] = (float("nan"), float("inf"), -float("inf"))[trial % 3]
        want = all(bool(torch.isfinite(t).all()) for t in ts)
        assert raw(*ts) == int(want), (trial, shape)
        assert fused.finite(*ts) is want
        seen[int(want)] += 1
    assert seen[0] > 20 and seen[1] > 20
    big = [torch.randn(2, 8, 512, 64, generator=gen).to(dtype) for _ in range(3)]  # 2^19 values: split over threads
    assert raw(*big) == 1
    for which, at in ((0, 0), (1, big[1].numel() // 2 + 3), (2, big[2].numel() - 1)):
        poisoned = [t.clone() for t in big]
        poisoned[which].view(-1)[at] = float("nan") if which != 1 else float("-inf")
        assert raw(*poisoned) == 0, (which, at)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_finite_check_shares_q_k_and_v_over_the_threads(gen, dtype):
    """2^17 values and more in all (each tensor below 2^18): q, k and v are one run split over the threads,
    whose parts cross the tensors' ends. A NaN or inf at each tensor's first and last value, and around
    the run's midpoint, is found wherever it falls."""
    raw = _build.module("attention").attention_all_finite
    shapes = [(1, 8, 40, 64), (2, 8, 128, 64), (2, 8, 128, 64)]  # 20480 + 131072 + 131072 values: q short, as at decode
    ts = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    assert raw(*ts) == 1
    total = sum(t.numel() for t in ts)
    spots = [(w, 0) for w in range(3)] + [(w, ts[w].numel() - 1) for w in range(3)]
    half = total // 2 - ts[0].numel()  # the run's midpoint, inside k
    spots += [(1, half - 1), (1, half), (1, half + 1)]
    for i, (which, at) in enumerate(spots):
        poisoned = [t.clone() for t in ts]
        poisoned[which].view(-1)[at] = (float("nan"), float("inf"), -float("inf"))[i % 3]
        assert raw(*poisoned) == 0, (which, at)
        assert fused.finite(*poisoned) is False


@needs_cpp
def test_finite_check_hands_other_layouts_to_the_sums():
    raw = _build.module("attention").attention_all_finite
    q = torch.randn(1, 2, 5, 6)
    k_t = torch.randn(1, 2, 6, 5).transpose(2, 3)  # last dimension strided
    k_t[0, 1, 3, 2] = float("nan")
    assert raw(q, k_t, q) == -1 and fused.finite(q, k_t, q) is False
    assert raw(q.double(), q.double(), q.double()) == -1 and fused.finite(q.double(), q.double(), q.double()) is True


def test_fused_sdpa_leaves_float64_to_torch_sdpa():
    """The C++ finite check does not read float64, so fused-sdpa would be torch-sdpa again there: the
    tuner gets no second copy of one kernel to time."""
    sdpa = next(k for k in get_registry().kernels_for("attention") if k.backend == "fused-sdpa")
    assert torch.float64 not in sdpa.dtypes and {torch.float32, torch.bfloat16, torch.float16} <= set(sdpa.dtypes)
