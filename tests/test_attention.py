"""Attention: the contract's semantics, bad input, and every built-in kernel through the conformance kit."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core import dispatcher
from core.errors import InvalidInput
from core.ops.attention import SPEC, make_inputs, plain_math
from core.spec import Sample
from plugins.reference.attention import attention as ref_attention
from registry.conformance import check_case, conformance_cases


def _ref(q, k, v, causal=False, mask=None, lse=False):
    return ref_attention(q.double(), k.double(), v.double(), causal=causal, scale=1 / math.sqrt(q.shape[-1]),
                         attn_mask=mask, return_lse=lse)


def test_square_causal_matches_torch_sdpa_is_causal(gen):
    q, k, v = make_inputs(gen, "cpu", torch.float64, 1, 2, 2, 20, 20, 8)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(_ref(q, k, v, causal=True), want, atol=1e-12)
    assert torch.allclose(dispatcher.attention(q, k, v, causal=True), want, atol=1e-10)


def test_causal_is_bottom_right_aligned(gen):
    # Lq = 1 with causal attends every key (decoding with a KV cache) ...
    q, k, v = make_inputs(gen, "cpu", torch.float64, 1, 2, 2, 1, 30, 8)
    assert torch.allclose(dispatcher.attention(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v), atol=1e-10)
    # ... and with Lq > Lk the first Lq - Lk rows attend nothing: output 0 and lse -inf, never NaN.
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 2, 2, 12, 5, 8)
    o, lse = dispatcher.attention(q, k, v, causal=True, return_lse=True)
    assert torch.all(o[:, :, :7] == 0) and torch.all(torch.isneginf(lse[:, :, :7]))
    assert torch.isfinite(o).all() and torch.isfinite(lse[:, :, 7:]).all()
    # row 7 sees exactly key 0: its output is v[0]
    assert torch.allclose(o[:, :, 7], v[:, :, 0], atol=1e-6)


def test_gqa_equals_repeated_heads(gen):
    q, k, v = make_inputs(gen, "cpu", torch.float64, 2, 6, 2, 9, 11, 8)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    assert torch.allclose(dispatcher.attention(q, k, v), want, atol=1e-10)
    assert torch.allclose(_ref(q, k, v), want, atol=1e-12)


def test_masked_nan_does_not_reach_the_output(gen):
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 2, 2, 6, 10, 8)
    mask = torch.ones(1, 1, 1, 10, dtype=torch.bool)
    mask[..., -3:] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -3:] = float("nan")
    v2[:, :, -3:] = float("inf")
    out = dispatcher.attention(q, k2, v2, attn_mask=mask)
    want = F.scaled_dot_product_attention(q.double(), k[:, :, :7].double(), v[:, :, :7].double())
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), want, atol=1e-5)
    for backend in ("reference", "torch", "torch-sdpa"):
        with dispatcher.use_backend(backend):
            assert torch.allclose(dispatcher.attention(q, k2, v2, attn_mask=mask).double(), want, atol=1e-5), backend


def test_compare_rules_accept_float32_math_and_reject_small_mistakes(gen):
    """The rules' bounds (a multiple of the plain math's error plus a floor of a few units) pass an
    honest float32 kernel and fail one off by a part in 10^4 in the output or in one gradient."""
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 2, 2, 24, 40, 16)
    args, attrs = SPEC.prepare((q, k, v), {"causal": True})
    sample = Sample(args=args, attrs=attrs)
    want = _ref(q, k, v, causal=True)
    assert SPEC.compare(dispatcher.attention(q, k, v, causal=True), want, sample).ok
    assert not SPEC.compare(dispatcher.attention(q, k, v, causal=True) * (1 + 1e-4), want, sample).ok

    g = torch.randn(want.shape, generator=gen)

    def grads(dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        o = plain_math(*leaves, True, attrs["scale"], None)[0] if dtype == torch.float64 \
            else dispatcher.attention(*leaves, causal=True)
        return torch.autograd.grad(o, leaves, g.to(dtype))

    exact, honest = grads(torch.float64), grads(torch.float32)
    assert SPEC.compare_grads(honest, exact, sample, (g,)).ok
    for i in range(3):
        off = [t.clone() for t in honest]
        off[i] = off[i] * (1 + 1e-4)
        verdict = SPEC.compare_grads(off, exact, sample, (g,))
        assert not verdict.ok and f"d{'qkv'[i]}" in verdict.reason


POISON = {  # where a non-finite input goes, on top of a NaN key and value at a masked (padding) key
    "masked-only": lambda q, k, v: None,
    "q-nan": lambda q, k, v: q[0, 0, 2].__setitem__(1, float("nan")),
    "k-inf-component": lambda q, k, v: k[0, 0, 3].__setitem__(3, float("-inf")),  # +-inf scores by q's sign
    "v-inf": lambda q, k, v: v[0, 1, 4].__setitem__(0, float("inf")),
    "v-nan": lambda q, k, v: v[0, 1, 4].__setitem__(0, float("nan")),
}


def _poisoned(gen, where):
    """GQA (4 query heads on 2 kv heads), bottom-right causal (every row attends keys 0-4, where the
    poison goes), the last 2 of 12 keys masked for padding."""
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 4, 2, 8, 12, 16)
    mask = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    mask[..., -2:] = False
    POISON[where](q, k, v)
    return q, k, v, mask


def _same_nonfinite_and_close(got, want):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (torch.isnan(got) != torch.isnan(want)).nonzero()
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)) and torch.equal(torch.isneginf(got),
                                                                                    torch.isneginf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite].double(), want[finite].double(), atol=1e-5)


@pytest.mark.parametrize("where", [w for w in POISON if w != "masked-only"])
def test_reference_follows_sdpa_math_on_attended_nonfinite_inputs(gen, where):
    """IEEE arithmetic, as PyTorch's math backend does it: a NaN or +inf score poisons its row, a -inf
    score is a weight of 0, an attended inf or NaN value reaches the output."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, _ = _poisoned(gen, where)  # nothing masked is poisoned: SDPA's math backend lets it through
    allowed = torch.ones(8, 12, dtype=torch.bool).tril(4)
    with sdpa_kernel(SDPBackend.MATH):
        peer = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed, enable_gqa=True)
    _same_nonfinite_and_close(_ref(q, k, v, causal=True), peer)
    assert not torch.isfinite(peer).all()  # the case does poison something


@pytest.mark.parametrize("backend", ["torch", "torch-sdpa", "fused", "fused-sdpa"])
@pytest.mark.parametrize("where", list(POISON))
def test_kernels_agree_with_the_reference_on_nonfinite_inputs(gen, backend, where):
    q, k, v, mask = _poisoned(gen, where)
    k[..., -1, :] = float("nan")  # at the masked padding key: reaches nothing
    v[..., -1, :] = float("nan")
    want_o, want_lse = _ref(q, k, v, causal=True, mask=mask, lse=True)
    with dispatcher.use_backend(backend):
        got_o = dispatcher.attention(q, k, v, causal=True, attn_mask=mask)
        if backend not in ("torch-sdpa", "fused-sdpa"):
            got_lse = dispatcher.attention(q, k, v, causal=True, attn_mask=mask, return_lse=True)[1]
            _same_nonfinite_and_close(got_lse, want_lse.float())
    _same_nonfinite_and_close(got_o, want_o.float())
    assert torch.isfinite(want_o).all() == (where == "masked-only")


def test_lse_is_log_sum_exp_of_scaled_scores(gen):
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 2, 1, 5, 7, 16)
    _, lse = dispatcher.attention(q, k, v, scale=0.3, return_lse=True)
    want = torch.logsumexp(0.3 * q.double() @ k.double().transpose(-1, -2), -1)
    assert lse.dtype == torch.float32 and torch.allclose(lse.double(), want, atol=1e-5)


BAD = [
    (lambda q, k, v: ((q[0], k, v), {}), "argument 'q': expected a 4-D tensor"),
    (lambda q, k, v: ((q.int(), k, v), {}), "argument 'q': expected dtype one of"),
    (lambda q, k, v: ((q, k.double(), v), {}), "argument 'k': expected dtype torch.float32"),
    (lambda q, k, v: ((q, k[..., :3], v), {}), "argument 'k': expected head dim 4"),
    (lambda q, k, v: ((q, k, v[:, :, :2]), {}), "argument 'v': expected [B, Hkv, Lk, Dv]"),
    (lambda q, k, v: ((q, k[:, :2], v[:, :2]), {}), "expected a number of key/value heads dividing the 3 query heads, got 2"),
    (lambda q, k, v: ((q, k[:1], v[:1]), {}), "expected batch 2"),
    (lambda q, k, v: ((q, k, v), {"scale": float("nan")}), "argument 'scale': expected a finite float"),
    (lambda q, k, v: ((q, k, v), {"causal": "yes"}), "argument 'causal': expected a bool, got 'yes'"),
    (lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(5, 6)}), "argument 'attn_mask': expected dtype torch.bool"),
    (lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(5, 7, dtype=torch.bool)}), "expected a shape broadcastable to [2, 3, 5, 6]"),
    (lambda q, k, v: ((q, k, v), {"dropout": 0.1}), "argument 'dropout': expected one of the attributes"),
    (lambda q, k, v: ((q, k), {}), "argument 'v': expected a value"),
    (lambda q, k, v: ((q, k, [1.0]), {}), "argument 'v': expected a torch.Tensor, got list"),
]


@pytest.mark.parametrize("make, message", BAD)
def test_bad_input_names_op_argument_and_values(make, message):
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    args, attrs = make(q, k, v)
    with pytest.raises(InvalidInput) as info:
        dispatcher.attention(*args, **attrs)
    assert message in str(info.value) and str(info.value).startswith("attention")


def test_key_buckets_lengths_and_keeps_what_changes_the_kernel():
    q = torch.randn(1, 2, 100, 8)
    k = torch.randn(1, 2, 120, 8)
    a = SPEC.key((q, k, k), {"causal": True, "scale": 0.1, "attn_mask": None, "return_lse": False})
    q2 = torch.randn(1, 2, 110, 8)
    b = SPEC.key((q2, k, k), {"causal": True, "scale": 0.1, "attn_mask": None, "return_lse": False})
    c = SPEC.key((q2, k, k), {"causal": False, "scale": 0.1, "attn_mask": None, "return_lse": False})
    assert a == b and a != c


BUILTIN = [c for backend in ("reference", "torch", "torch-sdpa") for c in conformance_cases(backend, ops=["attention"])]


@pytest.mark.parametrize("case", BUILTIN, ids=str)
def test_builtin_kernels_conform(case):
    check_case(case)
