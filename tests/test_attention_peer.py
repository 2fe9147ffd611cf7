"""Attention's cheap paths: the key verify hands back, the torch kernels' checks where nothing is masked
(none before the plain math, one sum before SDPA), and that non-finite inputs still get the contract's
answer on every one of them."""
from __future__ import annotations

import math

import pytest
import torch

from core import dispatcher
from core.ops.attention import SPEC, make_inputs, random_mask
from plugins.reference.attention import attention as ref_attention
from plugins.torch_backend import attention as torch_attention


def _ref(q, k, v, causal, mask=None, scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return ref_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale, attn_mask=mask,
                         return_lse=False)


KEY_CASES = [  # (B, Hq, Hkv, Lq, Lk, D, Dv, dtype, causal, mask shape)
    (1, 1, 1, 4, 4, 8, 8, torch.float32, False, None),
    (3, 8, 2, 1, 1000, 64, 64, torch.bfloat16, True, None),
    (2, 6, 3, 17, 33, 16, 24, torch.float64, True, (2, 1, 17, 33)),
    (5, 4, 4, 9, 9, 8, 8, torch.float16, False, (9,)),
    (1, 2, 1, 0, 7, 8, 8, torch.float32, False, (1, 1, 1, 7)),
]


@pytest.mark.parametrize("case", KEY_CASES, ids=str)
def test_verify_returns_the_dispatch_key(gen, case):
    B, Hq, Hkv, Lq, Lk, D, Dv, dtype, causal, mask_shape = case
    q, k, v = make_inputs(gen, "cpu", dtype, B, Hq, Hkv, Lq, Lk, D, Dv)
    mask = None if mask_shape is None else random_mask(gen, mask_shape, "cpu")
    for return_lse in (False, True):
        args, attrs = SPEC.bind((q, k, v), {"causal": causal, "attn_mask": mask, "return_lse": return_lse})
        key = SPEC.verify(args, attrs)
        assert key == SPEC.key(args, attrs)
        assert attrs["scale"] == 1 / math.sqrt(D)


def _poison(kind, q, k, v):
    """One non-finite value (or one column of them) somewhere every query attends."""
    if kind == "q-nan":
        q[0, 0, -1, 1] = float("nan")
    elif kind == "q-inf":
        q[0, -1, 0, 0] = float("inf")
    elif kind == "k-nan":
        k[0, 0, -1, 2] = float("nan")
    elif kind == "k-neg-inf":  # +-inf scores by the sign of q's component
        k[0, 0, 1, 0] = float("-inf")
    elif kind == "k-all-nan":  # every key of a head: SDPA's running max drops these whole
        k[0, 0, :, 3] = float("nan")
    elif kind == "v-inf":
        v[0, -1, 0, 1] = float("inf")
    elif kind == "v-nan":
        v[0, 0, -1, 0] = float("nan")


KINDS = ["q-nan", "q-inf", "k-nan", "k-neg-inf", "k-all-nan", "v-inf", "v-nan"]


def _same_nonfinite_and_close(got, want, atol, rtol=1e-5):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (torch.isnan(got) != torch.isnan(want)).nonzero()[:5]
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)) and torch.equal(torch.isneginf(got),
                                                                                    torch.isneginf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite].double(), want[finite].double(), atol=atol, rtol=rtol)


# Shapes where nothing, or only SDPA's own top-left triangle, is masked: not causal, decode (Lq = 1)
# causal, square causal; short key lengths (SDPA's kernels drop a NaN query row there) and GQA.
UNMASKED = [(1, 1, 1, 4, 4, False), (2, 4, 2, 1, 40, True), (1, 4, 1, 6, 6, True), (1, 2, 2, 3, 21, False)]


@pytest.mark.parametrize(("backend", "dtype"), [(b, d) for b in ("torch", "torch-sdpa", "fused", "fused-sdpa")
                                                 for d in (torch.float32, torch.bfloat16, torch.float64)
                                                 if not (b.startswith("fused") and d == torch.float64)])  # not theirs
def test_unmasked_nonfinite_inputs_follow_the_reference(gen, backend, dtype):
    # bfloat16: two units in the last place of the value besides the absolute floor (SDPA's bfloat16 kernels
    # round the probabilities to bfloat16: an output of 2.557 came out 2.531, against 2.5625 rounded, with
    # seed 1466450132 on a Xeon with AMX; an absolute 0.02 alone is less than one unit from 4 up)
    atol, rtol = (2e-2, 2 ** -6) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    for B, Hq, Hkv, Lq, Lk, causal in UNMASKED:
        for kind in KINDS:
            q, k, v = make_inputs(gen, "cpu", dtype, B, Hq, Hkv, Lq, Lk, 16)
            _poison(kind, q, k, v)
            want = _ref(q, k, v, causal)
            with dispatcher.use_backend(backend):
                got = dispatcher.attention(q, k, v, causal=causal)
            _same_nonfinite_and_close(got, want.to(dtype), atol, rtol)
            assert not torch.isfinite(want).all() or kind in ("q-inf", "k-neg-inf"), (kind, "the case poisons nothing")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bound_fused_sdpa_follows_the_reference_on_nonfinite_inputs(gen, dtype):
    """What fused-sdpa's bind returns (the dispatcher's warm calls: the C++ check, then SDPA with nothing
    around it) keeps the kernel's rules."""
    from plugins.fused import attention as fused

    atol, rtol = (2e-2, 2 ** -6) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    for B, Hq, Hkv, Lq, Lk, causal in UNMASKED + [(1, 2, 2, 3, 9, True)]:  # and one SDPA's mask cannot express
        bound = fused.bind_sdpa(causal=causal, scale=0.25, attn_mask=None, return_lse=False)
        for kind in [None, *KINDS]:
            q, k, v = make_inputs(gen, "cpu", dtype, B, Hq, Hkv, Lq, Lk, 16)
            if kind is not None:
                _poison(kind, q, k, v)
            _same_nonfinite_and_close(bound(q, k, v), _ref(q, k, v, causal, scale=0.25).to(dtype), atol, rtol)


def test_tuned_choice_follows_the_reference_on_nonfinite_inputs(gen):
    """Whatever kernel the tuner picked for these keys (warm, on finite inputs) answers poisoned ones right."""
    for B, Hq, Hkv, Lq, Lk, causal in UNMASKED:
        q, k, v = make_inputs(gen, "cpu", torch.float32, B, Hq, Hkv, Lq, Lk, 16)
        dispatcher.attention(q, k, v, causal=causal)
        for kind in KINDS:
            q2, k2, v2 = q.clone(), k.clone(), v.clone()
            _poison(kind, q2, k2, v2)
            _same_nonfinite_and_close(dispatcher.attention(q2, k2, v2, causal=causal),
                                      _ref(q2, k2, v2, causal).float(), 1e-5)


def test_a_sum_that_overflows_takes_the_exact_path_and_stays_right(gen):
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 2, 2, 5, 64, 8)
    v = v.abs() * 3e37 + 1e37  # finite, but their sum is not
    assert not torch_attention._finite(q, k, v) and torch.isfinite(v).all()
    want = _ref(q, k, v, False)
    for fn in (torch_attention.sdpa, torch_attention.attention):
        got = fn(q, k, v, causal=False, scale=1 / math.sqrt(8), attn_mask=None, return_lse=False)
        assert torch.isfinite(got).all()
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=0)


def test_float16_sums_accumulate_wide(gen):
    """Many ordinary float16 values sum past 65504: the check accumulates in float32, so no false alarm."""
    x = torch.ones(1, 1, 1 << 17, 8, dtype=torch.float16)
    assert torch_attention._finite(x[:, :, :1], x, x)
    y = x.clone()
    y[0, 0, 5, 5] = float("inf")
    assert not torch_attention._finite(x[:, :, :1], y, x)


def test_unmasked_math_gradients_match_float64(gen):
    q, k, v = make_inputs(gen, "cpu", torch.float32, 2, 6, 2, 1, 37, 16)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    leaves64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    g = torch.randn(2, 6, 1, 16, generator=gen)
    with dispatcher.use_backend("torch"):
        o = dispatcher.attention(*leaves, causal=True)
    o64 = torch.nn.functional.scaled_dot_product_attention(*leaves64, enable_gqa=True)
    o.backward(g)
    o64.backward(g.double())
    for a, b in zip(leaves, leaves64):
        assert torch.allclose(a.grad.double(), b.grad, atol=1e-5)


def test_lse_of_the_unmasked_math(gen):
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 4, 2, 3, 11, 8)
    o, lse = torch_attention.attention(q, k, v, causal=False, scale=0.7, attn_mask=None, return_lse=True)
    s = 0.7 * q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)
    assert lse.dtype == torch.float32 and torch.allclose(lse.double(), torch.logsumexp(s, -1), atol=1e-5)
    assert torch.allclose(o.double(), _ref(q, k, v, False, scale=0.7), atol=1e-5)


# -- CUDA's rule, run here: on a device whose values the host must not read back (``_sync_free``) ------

def _count_host_reads(patch):
    """Patch every way a tensor's value reaches the host; returns the list the reads are counted in."""
    reads = []
    for name in ("__bool__", "item", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        patch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmasked_math_reads_nothing_back_on_the_device_and_stays_right(gen, monkeypatch, dtype):
    """Where the host must not read device values (CUDA), the unmasked plain math makes no check at all:
    a row whose scores are all -inf is zeroed on the device, every other non-finite input gets IEEE's
    answer from the products. Each case's answer is the float64 reference's."""
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    monkeypatch.setattr(torch_attention, "_sync_free", lambda t: True)
    for B, Hq, Hkv, Lq, Lk, causal in UNMASKED:
        if causal and Lq > 1:  # SDPA's triangle, but masked positions for the plain math
            continue
        for kind in [*KINDS, "k-column-neg-inf", None]:
            q, k, v = make_inputs(gen, "cpu", dtype, B, Hq, Hkv, Lq, Lk, 16)
            if kind == "k-column-neg-inf":  # a head's rows score all -inf (q[..., 0] > 0: dead) or all +inf
                k[0, 0, :, 0] = float("-inf")
                q[0, 0, 0, 0] = q[0, 0, 0, 0].abs() + 0.5
            elif kind is not None:
                _poison(kind, q, k, v)
            want = _ref(q, k, v, causal)
            for return_lse in (False, True):
                with monkeypatch.context() as patch:
                    reads = _count_host_reads(patch)
                    got = torch_attention.attention(q, k, v, causal=causal, scale=1 / math.sqrt(16), attn_mask=None,
                                                    return_lse=return_lse)
                assert reads == [], (kind, reads)
                o = got[0] if return_lse else got
                _same_nonfinite_and_close(o, want.to(dtype), atol)
            if kind == "k-column-neg-inf":
                dead = q[0, : Hq // Hkv, :, 0] > 0
                assert dead.any() and (want[0, : Hq // Hkv][dead] == 0).all(), "the case has a dead row"


@pytest.mark.parametrize("backend", ["torch", "torch-sdpa"])
def test_masked_paths_read_back_only_the_finite_check_on_the_device(gen, monkeypatch, backend):
    """Masked positions: one host read (the finite check's sum) and nothing else; the rows that attend
    nothing are zeroed without asking whether there are any, and poisoned masked values reach nothing."""
    fn = torch_attention.attention if backend == "torch" else torch_attention.sdpa
    monkeypatch.setattr(torch_attention, "_sync_free", lambda t: True)
    for Lq, Lk, causal, mask_shape, poison in [(5, 9, True, None, False), (4, 12, False, (4, 12), False),
                                               (6, 6, True, (1, 1, 6, 6), False), (3, 10, True, (3, 10), True),
                                               (1, 7, False, (1, 7), False)]:
        q, k, v = make_inputs(gen, "cpu", torch.float32, 2, 4, 2, Lq, Lk, 16)
        mask = None if mask_shape is None else random_mask(gen, mask_shape, "cpu")
        if poison:  # NaN in a value, inf in a key, where no query may attend (the rare path: the exact math)
            mask[..., 2] = False
            v[:, :, 2, 3] = float("nan")
            k[:, :, 2, 1] = float("inf")
        want = _ref(q, k, v, causal, mask)
        with monkeypatch.context() as patch:
            reads = _count_host_reads(patch)
            got = fn(q, k, v, causal=causal, scale=1 / math.sqrt(16), attn_mask=mask, return_lse=False)
        assert poison or reads == ["item"], (Lq, Lk, causal, mask_shape, reads)
        assert mask is None or Lq == 1 or (want[:, :, Lq // 2] == 0).all(), "a row attends nothing"
        _same_nonfinite_and_close(got, want.float(), 1e-5)
