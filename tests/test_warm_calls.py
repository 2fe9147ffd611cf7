"""The dispatcher's memo of warm calls (``OpSpec.fast_key``, ``Kernel.bind``): a repeated call skips verify
and the key, and must still be exactly the slow path: the same kernel, the same result, the same errors,
the same fallbacks, and nothing served from it while a backend is forced."""
from __future__ import annotations

import itertools
import re
import warnings

import pytest
import torch

from core import dispatcher, hotpath
from core.errors import InvalidInput
from core.ops.attention import SPEC as ATTENTION
from core.ops.precision_cast import SPEC, TARGETS
from plugins.fused import _build
from plugins.fused import precision_cast as fused_cast
from plugins.reference.precision_cast import precision_cast as reference
from plugins.torch_backend.precision_cast import precision_cast as torch_cast
from registry import Kernel, hookimpl, loader

MARKER = 4321.0


@pytest.fixture(autouse=True)
def _fresh(fresh_dispatch):
    yield


def _outcome(x, **given):
    """What the slow path makes of a call: ("ok", its dispatch key) or ("invalid", the message)."""
    try:
        args, attrs = SPEC.bind((x,), given)
        key = SPEC.verify(args, attrs)
        return "ok", key if key is not None else SPEC.key(args, attrs)
    except InvalidInput as e:
        return "invalid", str(e)


def _calls(gen):
    """Calls of every kind the fast key must tell apart: sources, layouts, size buckets, every attribute
    (valid values, and invalid ones equal to valid ones, such as 1 for True), and inputs that are not
    float tensors."""
    xs = [torch.randn(n, generator=gen).to(dt) for n in (1, 5, 7, 8, 300, 513) for dt in
          (torch.float32, torch.float64, torch.bfloat16)]
    xs += [torch.randn(24, 40, generator=gen).t(), torch.randn(40, 24, generator=gen), torch.zeros(0),
           torch.arange(6), torch.randn(3, dtype=torch.complex64), torch.randn(8, device="meta")]
    attr_sets = [{"dtype": d} for d in (*TARGETS, torch.int8, "float16")]
    attr_sets += [{"dtype": torch.float16, **a} for a in (
        {"saturate": True}, {"saturate": 1}, {"saturate": 0}, {"margin": 1}, {"margin": True}, {"margin": 1.0},
        {"margin": -1}, {"margin": 200}, {"scaling": "amax"}, {"scaling": "AMAX"}, {"rounding": "stochastic"},
        {"rounding": "up"}, {"scaling": "amax", "margin": 3, "saturate": True})]
    calls = [(x, a) for x, a in itertools.product(xs, attr_sets)]
    calls += [([1.0, 2.0], {"dtype": torch.float16}), (3.0, {"dtype": torch.float16})]
    return calls


def test_equal_fast_keys_pass_verify_alike_with_one_dispatch_key(gen):
    """The fast key's contract, on every pair of a few thousand calls: equal fast keys, equal outcomes."""
    groups: dict = {}
    for x, given in _calls(gen) + _calls(gen):  # twice: fresh tensors of the same kinds must meet
        args, attrs = SPEC.bind((x,), given)
        fast = SPEC.fast_key(args, attrs)
        if fast is not None:
            groups.setdefault(fast, []).append(_outcome(x, **given))
    shared = [outcomes for outcomes in groups.values() if len(outcomes) > 1]
    assert len(shared) > 100  # the check has pairs to compare, valid and invalid alike
    assert any(o[0][0] == "invalid" for o in shared) and any(o[0][0] == "ok" for o in shared)
    for outcomes in shared:
        assert all(o == outcomes[0] for o in outcomes), outcomes


def test_a_seeded_call_has_no_fast_key(gen):
    x = torch.randn(64, generator=gen)
    assert SPEC.fast_key(*SPEC.bind((x,), {"dtype": torch.float16, "rounding": "stochastic", "seed": 5})) is None
    assert SPEC.fast_key(*SPEC.bind((x,), {"dtype": torch.float16})) is not None


@pytest.mark.parametrize("dtype", TARGETS, ids=str)
def test_warm_calls_are_the_slow_paths_results(dtype, gen):
    """Every size bucket and attribute set called twice (the second from the memo), on fresh data each
    time, bit for bit the reference's; the memo is what served them."""
    for n, scaling, saturate, margin in [(1, "none", False, 0), (100, "amax", True, 2), (4099, "none", True, 0),
                                         (70000, "amax", False, 1)]:
        kw = dict(dtype=dtype, scaling=scaling, saturate=saturate, margin=margin)
        for _ in range(2):
            x = torch.randn(n, generator=gen) * 50
            x[:: max(1, n // 7)] = float("inf")
            got = dispatcher.precision_cast(x, **kw)
            want = reference(x, rounding="nearest", seed=None, **kw)
            assert torch.equal(got.y.view(torch.uint8), want.y.view(torch.uint8))
            for field in ("scale", "amax", "nonfinite"):
                assert float(getattr(got, field)) == float(getattr(want, field)), field
    assert len(dispatcher._state.warm["precision_cast"]) == 4


def test_warm_stochastic_calls_draw_a_new_seed_each_time(gen):
    x = torch.randn(4096, generator=gen)
    a = dispatcher.precision_cast(x, dtype=torch.float8_e5m2, rounding="stochastic")
    b = dispatcher.precision_cast(x, dtype=torch.float8_e5m2, rounding="stochastic")
    assert len(dispatcher._state.warm["precision_cast"]) == 1
    assert not torch.equal(a.y.view(torch.uint8), b.y.view(torch.uint8))  # 4096 draws alike: chance 2^-1000s
    torch.manual_seed(7)
    c = dispatcher.precision_cast(x, dtype=torch.float8_e5m2, rounding="stochastic")
    torch.manual_seed(7)
    d = dispatcher.precision_cast(x, dtype=torch.float8_e5m2, rounding="stochastic")
    assert torch.equal(c.y.view(torch.uint8), d.y.view(torch.uint8))  # torch.manual_seed still governs it


@pytest.mark.parametrize("given, message", [
    ({"saturate": 1}, "argument 'saturate'"), ({"margin": True}, "argument 'margin'"),
    ({"margin": -1}, "argument 'margin'"), ({"rounding": ["nearest"]}, "argument 'rounding'"),
    ({"scaling": "AMAX"}, "argument 'scaling'"), ({"dtype": torch.int8}, "argument 'dtype'")])
def test_a_warm_key_still_rejects_what_verify_rejects(gen, given, message):
    x = torch.randn(100, generator=gen)
    for _ in range(2):
        dispatcher.precision_cast(x, dtype=torch.float16, saturate=True, margin=1)
    with pytest.raises(InvalidInput, match=message):
        dispatcher.precision_cast(x, **{"dtype": torch.float16, "saturate": True, "margin": 1, **given})
    with pytest.raises(InvalidInput, match="argument 'x'"):
        dispatcher.precision_cast(x.long(), dtype=torch.float16, saturate=True, margin=1)


class _Counting:
    """A precision_cast kernel that serves every call (the torch kernel inside) and counts them, with an
    optional bind, and one that raises when the data holds MARKER."""

    def __init__(self, bind=False, fail_on_marker=False, bind_raises=False, bind_wrong=False):
        self.calls = self.binds = 0
        self.bind, self.fail_on_marker, self.bind_raises, self.bind_wrong = bind, fail_on_marker, bind_raises, bind_wrong

    def fn(self, x, **attrs):
        self.calls += 1
        if self.fail_on_marker and bool((x == MARKER).any()):
            raise RuntimeError("marker seen")
        return torch_cast(x, **attrs)

    def bound(self, **attrs):
        self.binds += 1
        if self.bind_raises:
            raise RuntimeError("bind broke")
        if self.bind_wrong:  # right through fn, wrong through bind: truncates where the contract rounds
            return lambda x: self.fn((x.view(torch.int32) & ~0xFFFF).view(torch.float32), **attrs)
        return lambda x: self.fn(x, **attrs)

    @hookimpl
    def switchyard_kernels(self):
        return [Kernel(op="precision_cast", backend="counting", fn=self.fn, devices={"cpu"}, priority=1000,
                       bind=self.bound if (self.bind or self.bind_raises or self.bind_wrong) else None)]


@pytest.mark.parametrize("bind", [False, True], ids=["partial", "bind"])
def test_warm_calls_go_to_the_chosen_kernel_and_forced_backends_bypass_them(gen, plugin, monkeypatch, bind):
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "off")  # the highest priority that passes: the counting kernel
    counting = _Counting(bind=bind)
    plugin(counting, "counting")
    x = torch.randn(500, generator=gen)
    dispatcher.precision_cast(x, dtype=torch.bfloat16)  # validated (called on samples too) and served
    assert dispatcher.explain("precision_cast", x, dtype=torch.bfloat16).chosen == "counting"
    first, binds = counting.calls, counting.binds  # validation binds too: what a bind returns is validated
    assert (binds > 0) == bind
    for _ in range(2):
        dispatcher.precision_cast(x, dtype=torch.bfloat16)
    assert counting.calls == first + 2 and counting.binds == binds  # bound once, on the first call
    with dispatcher.use_backend("torch"):
        dispatcher.precision_cast(x, dtype=torch.bfloat16)
    monkeypatch.setenv("SWITCHYARD_BACKEND", "reference")
    dispatcher.precision_cast(x, dtype=torch.bfloat16)
    assert counting.calls == first + 2
    monkeypatch.delenv("SWITCHYARD_BACKEND")
    dispatcher.precision_cast(x, dtype=torch.bfloat16)
    assert counting.calls == first + 3


@pytest.mark.parametrize("bind", [False, True], ids=["partial", "bind"])
def test_a_kernel_raising_on_a_warm_call_is_quarantined(gen, plugin, monkeypatch, bind):
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "off")
    counting = _Counting(bind=bind, fail_on_marker=True)
    plugin(counting, "counting")
    x = torch.randn(500, generator=gen)
    dispatcher.precision_cast(x, dtype=torch.float16)
    dispatcher.precision_cast(x, dtype=torch.float16)  # from the memo
    x[7] = MARKER
    with pytest.warns(dispatcher.DispatchWarning, match="counting") as record:
        out = dispatcher.precision_cast(x, dtype=torch.float16)
    assert record[0].filename == __file__  # the warning names the caller's line, not the dispatcher's
    assert torch.equal(out.y, x.to(torch.float16))
    before = counting.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # the memo holds the fallback now, not the quarantined kernel
            dispatcher.precision_cast(x, dtype=torch.float16)
    assert counting.calls == before
    assert dispatcher.explain("precision_cast", x, dtype=torch.float16).chosen != "counting"


def test_a_kernel_whose_bind_raises_is_never_chosen(gen, plugin, monkeypatch):
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "off")
    plugin(_Counting(bind_raises=True), "counting")
    x = torch.randn(300, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found while validating: nothing to quarantine on a call
        out = dispatcher.precision_cast(x, dtype=torch.float16)
    assert torch.equal(out.y, x.to(torch.float16))
    exp = dispatcher.explain("precision_cast", x, dtype=torch.float16)
    row = next(r for r in exp.rows if r.backend == "counting")
    assert exp.chosen != "counting" and row.status == "failed" and "bind broke" in row.reason


OTHER_LEVEL = "avx2" if _build.machine_isa() == "avx512" else "scalar"


@pytest.mark.skipif(_build.unavailable_reason("precision_cast") is not None
                    or OTHER_LEVEL not in _build.supported_isas(), reason="no second level of the fused cast here")
def test_a_warm_fused_call_runs_the_level_in_force(gen, monkeypatch):
    """A key warmed at the machine's level, then called inside forced_isa: the bound call looks its
    level up per call, so the forced level serves it."""
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "off")  # the highest priority that passes: fused
    x = torch.randn(1000, generator=gen)
    for _ in range(2):
        dispatcher.precision_cast(x, dtype=torch.float16)
    assert dispatcher.explain("precision_cast", x, dtype=torch.float16).chosen == "fused"
    with _build.forced_isa(OTHER_LEVEL):
        fused_cast._library()
        real, seen = fused_cast._cast_ops[OTHER_LEVEL], []
        monkeypatch.setitem(fused_cast._cast_ops, OTHER_LEVEL, lambda *a: seen.append(1) or real(*a))
        out = dispatcher.precision_cast(x, dtype=torch.float16)
    assert len(seen) == 1 and torch.equal(out.y, x.to(torch.float16))
    dispatcher.precision_cast(x, dtype=torch.float16)
    assert len(seen) == 1


def test_a_kernel_whose_bind_is_wrong_is_never_chosen(gen, plugin, monkeypatch):
    """The trust rule covers what serves warm calls: the function a kernel's bind returns is validated
    beside its fn."""
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "off")
    plugin(_Counting(bind_wrong=True), "counting")
    x = torch.randn(300, generator=gen)
    for _ in range(2):
        out = dispatcher.precision_cast(x, dtype=torch.bfloat16)
        assert torch.equal(out.y, x.to(torch.bfloat16))
    exp = dispatcher.explain("precision_cast", x, dtype=torch.bfloat16)
    row = next(r for r in exp.rows if r.backend == "counting")
    assert exp.chosen != "counting" and row.status == "wrong" and "its bind returned" in row.reason


def test_the_conformance_kit_runs_what_a_bind_returns(plugin):
    """A third party's kit run (registry.conformance) judges the bound function as the tuner does."""
    from registry.conformance import conformance_cases, run_case

    plugin(_Counting(bind_wrong=True), "counting")
    case = next(c for c in conformance_cases("counting", ops=["precision_cast"]) if c.case == "f32-to-bf16")
    result = run_case(case, seed=3)
    assert result.status == "wrong" and "its bind returned" in result.reason
    loader.remove_plugin("counting")
    plugin(_Counting(bind=True), "counting")
    case = next(c for c in conformance_cases("counting", ops=["precision_cast"]) if c.case == "f32-to-bf16")
    assert run_case(case, seed=3).status == "ok"


# -- attention ---------------------------------------------------------------------------------------------

def _attention_outcome(args, given):
    """The slow path's outcome of an attention call: ("ok", canonical attributes, dispatch key) or
    ("invalid", the argument its message names; the message itself quotes exact sizes, which the fast key
    buckets)."""
    try:
        bound, attrs = ATTENTION.bind(args, given)
        key = ATTENTION.verify(bound, attrs)
        return "ok", dict(attrs), key if key is not None else ATTENTION.key(bound, attrs)
    except InvalidInput as e:
        named = re.search(r"argument '(\w+)'", str(e))
        return "invalid", named.group(1) if named else str(e)


def _attention_calls(gen):
    """Unmasked attention calls of every kind the fast key must tell apart: dtypes, GQA and mismatched
    heads, lengths in one size bucket (which share a fast key, as a growing cache's steps do), v shorter
    than k, head dims, layouts and strides, inputs that are not tensors, and attributes whose invalid
    values equal valid ones (1 for True, an int scale, a NaN scale)."""
    shapes = [((1, 4, 1, 16), (1, 4, 9, 16)), ((1, 4, 1, 16), (1, 2, 9, 16)), ((1, 4, 1, 16), (1, 3, 9, 16)),
              ((1, 4, 1, 16), (1, 4, 10, 16)), ((1, 4, 3, 16), (1, 4, 9, 16)), ((2, 4, 1, 16), (1, 4, 9, 16)),
              ((1, 4, 1, 8), (1, 4, 9, 8)), ((1, 4, 1, 16), (1, 4, 9, 8)), ((1, 4, 0, 16), (1, 4, 9, 16))]
    calls = []
    for (qs, ks), dt in itertools.product(shapes, (torch.float32, torch.bfloat16, torch.int32)):
        q = torch.randn(qs, generator=gen).to(dt)
        k, v = (torch.randn(ks, generator=gen).to(dt) for _ in range(2))
        for args in [(q, k, v), (q.transpose(1, 2).contiguous().transpose(1, 2), k, v), (q, k, v.double()),
                     (q, k, v[..., :-1]), (q, k, v[:, :, :-1]), (q[0], k, v), (q, k.tolist(), v)]:
            for given in [{}, {"causal": True}, {"causal": 1}, {"scale": 0.5}, {"scale": 1}, {"scale": True},
                          {"scale": float("nan")}, {"causal": True, "return_lse": True}, {"return_lse": 0}]:
                calls.append((args, given))
    return calls


def test_attention_equal_fast_keys_pass_verify_alike_with_one_dispatch_key(gen):
    groups: dict = {}
    for args, given in _attention_calls(gen) + _attention_calls(gen):  # fresh tensors of the same kinds meet
        bound, attrs = ATTENTION.bind(args, given)
        fast = ATTENTION.fast_key(bound, attrs)
        if fast is not None:
            try:
                groups.setdefault(fast, []).append(_attention_outcome(args, given))
            except TypeError:  # unhashable (a list of lists): the dispatcher's lookup takes the slow path
                pass
    shared = [outcomes for outcomes in groups.values() if len(outcomes) > 1]
    assert len(shared) > 300
    assert any(o[0][0] == "invalid" for o in shared) and any(o[0][0] == "ok" for o in shared)
    for outcomes in shared:
        assert all(o == outcomes[0] for o in outcomes), outcomes


def test_a_masked_attention_call_has_no_fast_key(gen):
    q, k, v = (torch.randn(1, 2, 3, 8, generator=gen) for _ in range(3))
    assert ATTENTION.fast_key(*ATTENTION.bind((q, k, v), {"attn_mask": torch.ones(3, 3, dtype=torch.bool)})) is None
    assert ATTENTION.fast_key(*ATTENTION.bind((q, k, v), {})) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_warm_attention_calls_are_the_slow_paths_results(dtype, gen):
    """Decode and prefill keys, with and without the log-sum-exp, called twice each (the second from the
    memo, on fresh data) against the float64 math; then a call with gradients on the same shapes, which
    the memo keys apart and which must get gradients."""
    shapes = [(1, 4, 2, 1, 300, 32), (2, 2, 2, 20, 20, 16)]
    for (B, Hq, Hkv, Lq, Lk, D), causal, lse in itertools.product(shapes, (False, True), (False, True)):
        for _ in range(2):
            q = torch.randn(B, Hq, Lq, D, generator=gen).to(dtype)
            k, v = (torch.randn(B, Hkv, Lk, D, generator=gen).to(dtype) for _ in range(2))
            got = dispatcher.attention(q, k, v, causal=causal, return_lse=lse)
            o, want_lse = _attention64(q, k, v, causal)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close((got[0] if lse else got).double(), o, atol=tol, rtol=tol)
            if lse:
                torch.testing.assert_close(got[1].double(), want_lse, atol=tol, rtol=tol)
    assert len(dispatcher._state.warm["attention"]) == 8
    q = torch.randn(1, 4, 1, 32, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 300, 32, generator=gen, requires_grad=True) for _ in range(2))
    dispatcher.attention(q, k, v).sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    assert len(dispatcher._state.warm["attention"]) == 9


def test_a_growing_cache_stays_on_one_warm_entry(gen):
    """Decode steps whose cache grows by a key a step, within one size bucket, share the memo's entry, and
    each gets its own answer."""
    q = torch.randn(1, 4, 1, 32, generator=gen)
    k, v = (torch.randn(1, 2, 140, 32, generator=gen) for _ in range(2))
    for Lk in range(129, 141):
        got = dispatcher.attention(q, k[:, :, :Lk], v[:, :, :Lk], causal=True)
        torch.testing.assert_close(got.double(), _attention64(q, k[:, :, :Lk], v[:, :, :Lk], True)[0],
                                   atol=1e-5, rtol=1e-5)
    assert len(dispatcher._state.warm["attention"]) == 1


def _attention64(q, k, v, causal):
    q, k, v = (t.double() for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    Lq, Lk = q.shape[2], k.shape[2]
    if causal:
        s = s.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


# -- the C++ memo keys (core.hotpath) ----------------------------------------------------------------------

def _with_grad_variants(calls):
    """Each call as given, and again with q requiring gradients, under grad mode on and off."""
    out = []
    for args, given in calls:
        out.append((args, given, True))
        if isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            out.append(((args[0].detach().requires_grad_(), *args[1:]), given, True))
            out.append(((args[0].detach().requires_grad_(), *args[1:]), given, False))
    return out


class _Sub(torch.Tensor):
    pass


@pytest.mark.skipif(not hotpath.keys(), reason=f"the C++ memo keys are not built: {hotpath.unavailable_reason()}")
@pytest.mark.parametrize("op", sorted(hotpath.OPS))
def test_the_cpp_memo_keys_draw_exactly_the_python_keys_distinctions(op, gen):
    """Over every kind of call the Python keys' own tests use (and, for attention, gradients on and off):
    two calls share a C++ key exactly when they share the Python key and grad mark, and every plain-tensor
    call with a Python key has a C++ key; a tensor subclass gets none (its full path reads its Python
    attributes). The dispatcher uses the C++ keys once they are built."""
    spec = dispatcher._SPECS[op]
    native, python = hotpath.keys()[op], dispatcher._python_memo_key(spec)
    if op == "attention":
        calls = [(args, given, grad) for args, given, grad in _with_grad_variants(_attention_calls(gen) + _attention_calls(gen))]
        sub = ((torch.randn(1, 2, 1, 8).as_subclass(_Sub), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)), {}, True)
        param = ((torch.nn.Parameter(torch.randn(1, 2, 1, 8)), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)), {}, True)
    else:
        calls = [((x,), given, True) for x, given in _calls(gen) + _calls(gen)]
        sub = ((torch.randn(8).as_subclass(_Sub),), {"dtype": torch.float16}, True)
        param = ((torch.nn.Parameter(torch.randn(8)),), {"dtype": torch.float16}, True)
    by_native: dict = {}
    by_python: dict = {}
    keyed = 0
    for args, given, grad in calls + [param]:
        bound, attrs = spec.bind(args, given)
        with torch.set_grad_enabled(grad):
            n, p = native(bound, attrs), python(bound, attrs)
        plain = all(type(a) in (torch.Tensor, torch.nn.Parameter) for a in bound)
        if p is not None and plain:
            assert n is not None, (args, given)
        if n is None or p is None:
            assert n is None or p is not None
            continue
        try:
            by_native.setdefault(n, set()).add(p)
            by_python.setdefault(p, set()).add(n)
        except TypeError:  # an unhashable attribute: both lookups raise, and the dispatcher goes the full way
            continue
        keyed += 1
    assert keyed > 300 and len(by_native) > 50
    assert all(len(ps) == 1 for ps in by_native.values())
    assert all(len(ns) == 1 for ns in by_python.values())
    args, given, _ = sub
    assert native(*spec.bind(args, given)) is None and python(*spec.bind(args, given)) is not None
    dispatcher.call(op, *param[0], **param[1])  # a miss: the dispatcher then takes the C++ keys
    assert dispatcher._memo_key[op] is native


@pytest.mark.parametrize("env", [{"SWITCHYARD_DISABLE_CPP": "1"}, {"PATH": "/nonexistent", "CXX": "no-such-compiler"}],
                         ids=["switched-off", "no-compiler"])
def test_without_a_compiler_the_python_keys_serve_and_the_reason_is_said(env, tmp_path):
    import os
    import subprocess
    import sys

    code = """
import torch
from core import dispatcher, hotpath
q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
for _ in range(3):
    out = dispatcher.attention(q, k, v, causal=True)
torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
assert dispatcher._memo_key["attention"].__module__ == "core.dispatcher"
assert len(dispatcher._state.warm["attention"]) == 1
print("REASON", hotpath.unavailable_reason())
"""
    full = dict(os.environ, SWITCHYARD_BUILD_DIR=str(tmp_path / "build"), SWITCHYARD_CACHE_DIR=str(tmp_path / "cache"), **env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=240,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    reason = done.stdout.split("REASON", 1)[1]
    assert ("SWITCHYARD_DISABLE_CPP" in reason) if "SWITCHYARD_DISABLE_CPP" in env else ("no C++ compiler" in reason)
    assert not (tmp_path / "build").exists() or not any((tmp_path / "build").glob("hotpath-*/*.so"))
