"""torch.ops.switchyard.*: opcheck for every op with each kernel forced, aliasing, attention's autograd
against the eager dispatcher's, and the CUDA-graph capture rule (with the capture check patched)."""
from __future__ import annotations

import pytest
import torch

from core import dispatcher, library
from core.errors import InvalidInput, Unsupported
from core.ops.attention import make_inputs, random_mask
from core.ops.decode_step import medusa_tree
from core.ops.decode_step import make_inputs as decode_inputs
from core.ops.split_finding import make_inputs as split_inputs

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.fixture(autouse=True)
def _quick_tuning(monkeypatch):
    monkeypatch.setenv("SWITCHYARD_TUNE_BUDGET", "0.005")
    yield


def _samples(gen: torch.Generator) -> dict[str, tuple[object, tuple, dict]]:
    """One small sample per op, as torch.ops.switchyard.<op> takes it (every attribute positional)."""
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 4, 2, 5, 7, 8)
    mask = random_mask(gen, (1, 1, 5, 7), "cpu")
    bins, grad, hess, node_ids = split_inputs(gen, "cpu", n=64, f=3, num_nodes=2, num_bins=16)
    dsample = decode_inputs(gen, "cpu", B=2, parents=medusa_tree(6), V=11, rule="typical")
    dt, par, logits = dsample.args
    x = torch.randn(33, generator=gen)
    db = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    qs = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    return {
        "attention": (torch.ops.switchyard.attention,
                      (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, True, None, True, True), {}),
        "precision_cast": (torch.ops.switchyard.precision_cast, (x, torch.float8_e4m3fn, "nearest", "amax", True, 1, None), {}),
        "split_finding": (torch.ops.switchyard.split_finding, (bins, grad, hess, node_ids, 2, 16, 1.0, 0.0, 0.0, 1.0), {}),
        "nearest_neighbor": (torch.ops.switchyard.nearest_neighbor, (qs, db, 3, "l2"), {}),
        "decode_step": (torch.ops.switchyard.decode_step, (dt, par, logits, None, "typical", 0.0, 0.09, 0.3), {}),
        "all_reduce": (torch.ops.switchyard.all_reduce, ([x, db], "sum", None), {}),
    }


def _backends(op: str) -> list[str]:
    return sorted({v.kernel.backend for v in dispatcher.tuner().variants(op)})


@pytest.mark.parametrize("op", ["attention", "precision_cast", "split_finding", "nearest_neighbor", "decode_step",
                                "all_reduce"])
def test_opcheck_every_kernel(op, gen):
    fn, args, kwargs = _samples(gen)[op]
    checked = []
    for backend in _backends(op):
        if backend.endswith("triton") or backend == "acme":
            continue  # Triton runs interpreted here (its own tests check it); acme is the example plugin
        with dispatcher.use_backend(backend):
            try:
                fn(*args, **kwargs)
            except Unsupported:
                continue  # this kernel does not serve this sample (its reasons are tested elsewhere)
            torch.library.opcheck(fn, args, kwargs, test_utils=OPCHECK_TESTS)
        checked.append(backend)
    assert len(checked) >= 2, checked  # attention's reference is not differentiable: grad samples skip it


def test_outputs_never_alias_inputs(gen):
    x = torch.randn(8, generator=gen)
    (out,) = torch.ops.switchyard.all_reduce([x], "sum", None)  # a world of one: the value is the input's
    assert torch.equal(out, x) and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    y, scale, amax, nonfinite = torch.ops.switchyard.precision_cast(x, torch.float16, "nearest", "none", False, 0, None)
    assert torch.equal(y, x.to(torch.float16)) and float(scale) == 1.0 and float(amax) == float(x.abs().max())


def test_attention_op_gradients_equal_eager(gen):
    q, k, v = make_inputs(gen, "cpu", torch.float64, 2, 4, 2, 6, 9, 8)
    mask = random_mask(gen, (2, 1, 6, 9), "cpu", dead_row=False)
    go = torch.randn(2, 4, 6, 8, generator=gen, dtype=torch.float64)
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    o = dispatcher.attention(*eager, causal=True, attn_mask=mask)
    want = torch.autograd.grad(o, eager, go)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o2, lse = torch.ops.switchyard.attention(*leaves, mask, True, None, False, True)
    assert lse.numel() == 0
    got = torch.autograd.grad(o2, leaves, go)
    torch.testing.assert_close(o2, o, rtol=0, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # and against the float64 math directly (not the code under test)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    kk, vv = (t.repeat_interleave(2, 1) for t in ref[1:])
    allowed = (torch.arange(9)[None, :] <= torch.arange(6)[:, None] + 3) & mask
    p = torch.softmax((ref[0] @ kk.transpose(-1, -2) / 8 ** 0.5).masked_fill(~allowed, float("-inf")), -1)
    for g, w in zip(got, torch.autograd.grad(p @ vv, ref, go)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_bad_input_raises_invalid_input_from_the_op(gen):
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 4, 2, 5, 7, 8)
    with pytest.raises(InvalidInput, match=r"attention: argument 'k': expected head dim 8"):
        torch.ops.switchyard.attention(q, k[..., :4], v, None, False, None, False, False)
    with pytest.raises(InvalidInput, match=r"invalid_call says"):
        torch.ops.switchyard.invalid_call([q], "invalid_call says no")


# -- CUDA graphs: the capture rule, with the capture check patched (no GPU here) -------------------------

def test_capture_uses_decided_kernels_and_never_tunes(gen, monkeypatch):
    x = torch.randn(3000, generator=gen)
    warm = dispatcher.precision_cast(x, dtype=torch.bfloat16)  # decides this key outside the capture
    monkeypatch.setattr(dispatcher, "_stream_capturing", lambda spec, args, attrs: True)
    tuned = []
    monkeypatch.setattr(dispatcher.tuner(), "_tune", lambda *a, **k: tuned.append(a) or pytest.fail("tuned"))
    again = dispatcher.precision_cast(x, dtype=torch.bfloat16)  # warm key: served as decided
    assert torch.equal(again.y, warm.y)
    dispatcher.reset()  # the decision now lives in the tuning cache only: still served, not tuned
    monkeypatch.setattr(dispatcher.tuner(), "_tune", lambda *a, **k: tuned.append(a) or pytest.fail("tuned"))
    assert torch.equal(dispatcher.precision_cast(x, dtype=torch.bfloat16).y, warm.y)
    cold = torch.randn(5, 300, generator=gen)
    with pytest.raises(Unsupported, match=r"precision_cast: no kernel is decided for dispatch key .*captured into a "
                                          r"CUDA graph.*warm-up call.*python -m core.autotune"):
        dispatcher.precision_cast(cold, dtype=torch.float8_e5m2, scaling="amax")
    assert not tuned


def test_capture_check_is_off_the_hot_path():
    calls = []
    real = dispatcher._stream_capturing
    spec = dispatcher._SPECS["attention"]
    q = torch.randn(1, 1, 2, 4)
    assert real(spec, (q, q, q), {}) is False  # a CPU call is never a capture
    dispatcher.attention(q, q, q)
    orig = torch.cuda.is_current_stream_capturing
    try:
        torch.cuda.is_current_stream_capturing = lambda: calls.append(1) or False  # type: ignore[assignment]
        dispatcher.attention(q, q, q)  # warm key
    finally:
        torch.cuda.is_current_stream_capturing = orig  # type: ignore[assignment]
    assert not calls


def test_library_module_is_the_registered_namespace():
    for op in ("attention", "attention_backward", "precision_cast", "split_finding", "nearest_neighbor",
               "decode_step", "all_reduce", "invalid_call"):
        assert hasattr(torch.ops.switchyard, op)
    assert library.NS == "switchyard"
