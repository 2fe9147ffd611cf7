"""The dispatcher's contract: trust rule, fallbacks, forced backends, shadow mode, autograd, threads."""
from __future__ import annotations

import math
import re
import threading
import warnings

import pytest
import torch

import bad_kernels
from core import dispatcher
from core.errors import InvalidInput, Unsupported, ValidationError
from core.ops.attention import make_inputs
from plugins.reference.attention import attention as reference_attention
from registry import loader

BAD = ("bad-values", "bad-raises", "bad-shape", "bad-nan", "bad-scale")


@pytest.fixture(autouse=True)
def _fresh(fresh_dispatch):
    yield


def _max_err(a, b):
    return float((a.double() - b.double()).abs().max())


def _inputs(gen, Lq=48, Lk=64, D=32, Hq=4, Hkv=2, B=2):
    return make_inputs(gen, "cpu", torch.float32, B, Hq, Hkv, Lq, Lk, D)


def test_attention_entry_and_call_agree_with_reference(gen):
    q, k, v = _inputs(gen)
    out = dispatcher.attention(q, k, v, causal=True)
    via_call = dispatcher.call("attention", q, k, v, causal=True)
    ref = reference_attention(q.double(), k.double(), v.double(), causal=True, scale=1 / math.sqrt(32),
                              attn_mask=None, return_lse=False)
    assert out.shape == (2, 4, 48, 32) and out.dtype == torch.float32
    assert _max_err(out, ref) < 1e-5
    assert _max_err(via_call, ref) < 1e-5


def test_inputs_by_keyword(gen):
    q, k, v = _inputs(gen)
    assert _max_err(dispatcher.attention(q=q, k=k, v=v), dispatcher.attention(q, k, v)) == 0.0


def test_each_entry_takes_its_ops_attributes_as_keyword_parameters():
    # the generated entries: Python binds a well-formed call (spec.bind is the slow path); the signature
    # is the spec's, so help() and editors show the attributes and their defaults
    import inspect

    from core.spec import REQUIRED

    for name, spec in dispatcher._SPECS.items():
        params = inspect.signature(getattr(dispatcher, name)).parameters
        attrs = [p for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert [p.name for p in attrs] == [a.name for a in spec.attrs], name
        assert all(p.default is a.default or p.default == a.default for p, a in zip(attrs, spec.attrs)), name
        assert [p.kind for p in params.values()][0] is inspect.Parameter.VAR_POSITIONAL, name
        assert all((p.default is REQUIRED) == (a.default is REQUIRED) for p, a in zip(attrs, spec.attrs)), name


@pytest.mark.parametrize("args, attrs, message", [
    (1, {}, "argument 'dtype': expected a value (it is required), got nothing"),
    (2, {"dtype": torch.float16}, "expected 1 positional inputs (x), got 2; attributes are keyword-only"),
    (1, {"dtype": torch.float16, "round": "nearest"}, "argument 'round': expected one of the attributes"),
    (0, {"dtype": torch.float16}, "argument 'x': expected a value, got nothing"),
    (1, {"dtype": torch.float16, "x": "again"}, "argument 'x': expected one of the attributes"),
    (1, {"dtype": "float16"}, "argument 'dtype': expected one of"),
    (1, {"dtype": torch.float16, "margin": True}, "argument 'margin': expected an int"),
])
def test_malformed_calls_get_the_specs_errors(args, attrs, message):
    # the generated entry and the generic one (spec.bind on every call) refuse alike
    x = torch.randn(8)
    texts = []
    for entry in (dispatcher.precision_cast, dispatcher._generic_entry(dispatcher._SPECS["precision_cast"]),
                  lambda *a, **k: dispatcher.call("precision_cast", *a, **k)):
        with pytest.raises(InvalidInput) as info:
            entry(*[x] * args, **attrs)
        texts.append(str(info.value))
    assert texts[0] == texts[1] == texts[2]
    assert texts[0].startswith("precision_cast: ") and message in texts[0], texts[0]


def test_entries_forms_of_one_call_agree(gen):
    x = torch.randn(1000, generator=gen)
    forms = [dispatcher.precision_cast(x, dtype=torch.bfloat16),
             dispatcher.precision_cast(x=x, dtype=torch.bfloat16),
             dispatcher.precision_cast(x, dtype=torch.bfloat16, rounding="nearest", scaling="none", saturate=False,
                                       margin=0, seed=None),
             dispatcher.call("precision_cast", x, dtype=torch.bfloat16),
             dispatcher.call("precision_cast", x=x, dtype=torch.bfloat16)]
    want = x.to(torch.bfloat16)  # round to nearest even, no scaling: torch's cast is exact here
    for out in forms:
        assert torch.equal(out.y.view(torch.int16), want.view(torch.int16))
        assert float(out.scale) == 1.0 and float(out.amax) == float(x.abs().max()) and int(out.nonfinite) == 0


def test_bad_kernels_are_never_chosen(gen, plugin):
    plugin(bad_kernels.BadPlugin(), "bad")
    q, k, v = _inputs(gen)
    out = dispatcher.attention(q, k, v)
    exp = dispatcher.explain("attention", q, k, v)
    assert exp.chosen not in BAD
    rows = {r.backend: r for r in exp.rows}
    assert rows["bad-values"].status == "wrong"
    assert rows["bad-raises"].status == "failed" and "always raises" in rows["bad-raises"].reason
    assert rows["bad-shape"].status == "wrong" and "shape" in rows["bad-shape"].reason
    assert rows["bad-nan"].status == "wrong" and "NaN" in rows["bad-nan"].reason
    assert rows["bad-scale"].status == "wrong"
    ref = reference_attention(q.double(), k.double(), v.double(), causal=False, scale=1 / math.sqrt(32),
                              attn_mask=None, return_lse=False)
    assert _max_err(out, ref) < 1e-5
    assert "bad-values" in str(exp) and "chosen" in exp.table()


def test_bad_kernels_lose_with_autotune_off(gen, plugin, monkeypatch):
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "off")
    plugin(bad_kernels.BadPlugin(), "bad")
    q, k, v = _inputs(gen)
    dispatcher.attention(q, k, v)
    exp = dispatcher.explain("attention", q, k, v)
    validated = [r for r in exp.rows if r.status in ("ok", "chosen")]
    assert exp.chosen == max(validated, key=lambda r: r.priority).backend  # the highest priority that passed
    assert exp.chosen not in BAD and "autotuning is off" in exp.why
    assert all(r.median_ms is None for r in exp.rows)


def test_raise_on_user_data_quarantines_and_falls_back(gen, plugin, monkeypatch):
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "off")  # the marker kernel has the highest priority: it is chosen
    plugin(bad_kernels.MarkerPlugin(), "marker")
    q, k, v = _inputs(gen)
    dispatcher.attention(q, k, v)
    assert dispatcher.explain("attention", q, k, v).chosen == "marker"
    q2 = q.clone()
    q2[0, 0, 0, 0] = bad_kernels.MARKER
    with pytest.warns(dispatcher.DispatchWarning, match="marker"):
        out = dispatcher.attention(q2, k, v)
    ref = reference_attention(q2.double(), k.double(), v.double(), causal=False, scale=1 / math.sqrt(32),
                              attn_mask=None, return_lse=False)
    assert _max_err(out, ref) < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the next calls go straight to the fallback
        dispatcher.attention(q2, k, v)
        dispatcher.attention(q, k, v)
    exp = dispatcher.explain("attention", q2, k, v)
    assert exp.chosen != "marker" and "quarantined" in exp.why
    marker = next(r for r in exp.rows if r.backend == "marker")
    assert marker.status == "failed" and "marker seen" in marker.reason


def test_forced_backend_context_and_env(gen, monkeypatch):
    q, k, v = _inputs(gen)
    with dispatcher.use_backend("reference"):
        a = dispatcher.attention(q, k, v)
        assert dispatcher.explain("attention", q, k, v).chosen == "reference"
    monkeypatch.setenv("SWITCHYARD_BACKEND", "torch")
    b = dispatcher.attention(q, k, v)
    assert dispatcher.explain("attention", q, k, v).chosen == "torch"
    assert _max_err(a, b) < 1e-5


def test_forced_unsupported_backend_raises_with_reasons(gen):
    q, k, v = _inputs(gen)
    with dispatcher.use_backend("torch-sdpa"), pytest.raises(Unsupported, match="return_lse=True"):
        dispatcher.attention(q, k, v, return_lse=True)
    with dispatcher.use_backend("nonexistent"), pytest.raises(Unsupported, match="nonexistent"):
        dispatcher.attention(q, k, v)


def test_shadow_validation_raises_on_mismatch(gen, plugin, monkeypatch):
    plugin(bad_kernels.BadPlugin(), "bad")
    q, k, v = _inputs(gen)
    monkeypatch.setenv("SWITCHYARD_VALIDATE", "always")
    dispatcher.attention(q, k, v)  # the chosen kernel is right: no error
    with dispatcher.use_backend("bad-scale"), pytest.raises(ValidationError, match="bad-scale"):
        dispatcher.attention(q, k, v)


def test_no_kernel_lists_every_backend(gen, monkeypatch):
    q, k, v = _inputs(gen)
    q, k, v = q.half(), k.half(), v.half()
    monkeypatch.setenv("SWITCHYARD_BLOCK", "torch,reference")
    loader.reload()
    try:
        with pytest.raises(Unsupported) as info:
            dispatcher.attention(q, k, v, return_lse=True)
    finally:
        monkeypatch.delenv("SWITCHYARD_BLOCK")
        loader.reload()
    text = str(info.value)
    assert "No kernel can serve attention(" in text and "float16" in text
    assert "torch-sdpa" not in text  # blocked: not loaded at all


def test_autograd_uses_differentiable_kernels_with_validated_gradients(gen, plugin):
    plugin(bad_kernels.WrongGradPlugin(), "wronggrad")
    q, k, v = (t.requires_grad_(True) for t in _inputs(gen, Lq=16, Lk=16, D=8))
    out = dispatcher.attention(q, k, v, causal=True)
    exp = dispatcher.explain("attention", q, k, v, causal=True)
    rows = {r.backend: r for r in exp.rows}
    assert exp.key[-1] == "grad"
    assert rows["reference"].status == "unsupported" and "differentiable" in rows["reference"].reason
    assert rows["wrong-grad"].status == "wrong" and "gradients" in rows["wrong-grad"].reason
    # which differentiable kernel wins is a matter of timing (fused, torch and torch-sdpa all qualify, and
    # under load the race keeps the default, fused); what must hold is that it is differentiable and its
    # gradients passed validation, and (below) that they match float64
    chosen = dispatcher.tuner().variant("attention", exp.chosen)
    assert chosen.kernel.differentiable and rows[exp.chosen].status == "chosen"
    assert rows[exp.chosen].max_error is not None and exp.chosen not in ("reference", "wrong-grad")
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    from plugins.torch_backend.attention import attention as torch_attention

    ref = torch_attention(q2, k2, v2, causal=True, scale=1 / math.sqrt(8), attn_mask=None, return_lse=False)
    ref.backward(g.double())
    for a, b in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert _max_err(a, b) < 1e-4
    with torch.no_grad():  # without grad the same shapes are a different key
        dispatcher.attention(q, k, v, causal=True)
    assert dispatcher.explain("attention", q.detach(), k.detach(), v.detach(), causal=True).key[-1] != "grad"


def test_threads_share_one_decision(gen):
    q, k, v = _inputs(gen, Lq=33, Lk=40)
    ref = reference_attention(q.double(), k.double(), v.double(), causal=False, scale=1 / math.sqrt(32),
                              attn_mask=None, return_lse=False)
    errors, results = [], []

    def work():
        try:
            for _ in range(5):
                results.append(_max_err(dispatcher.attention(q, k, v), ref))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(results) == 30 and max(results) < 1e-5
    assert sum(1 for (op, _) in dispatcher.tuner().decisions if op == "attention") == 1


def test_cache_hit_in_a_new_process_state(gen):
    q, k, v = _inputs(gen)
    dispatcher.attention(q, k, v)
    first = dispatcher.explain("attention", q, k, v)
    assert first.why.startswith("fastest")
    dispatcher.reset()  # a fresh process would see the same file
    second = dispatcher.explain("attention", q, k, v)
    assert second.why.startswith("from the tuning cache")
    assert second.chosen == first.chosen


def test_unknown_op_and_bad_env(gen, monkeypatch):
    with pytest.raises(InvalidInput, match="unknown op 'nope'"):
        dispatcher.call("nope", 1)
    q, k, v = _inputs(gen)
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "sometimes")
    with pytest.raises(InvalidInput, match="SWITCHYARD_AUTOTUNE"):
        dispatcher.attention(q, k, v)


def test_kernel_failing_while_timed_leaves_the_reference(gen, plugin, monkeypatch):
    monkeypatch.setenv("SWITCHYARD_BLOCK", "torch,fused")
    monkeypatch.setenv("SWITCHYARD_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugin(bad_kernels.LargeFailPlugin(), "largefail")
    q, k, v = _inputs(gen, Lq=400, Lk=400, D=16, Hq=2, Hkv=2, B=1)  # past the size validated in full
    out = dispatcher.attention(q, k, v)
    exp = dispatcher.explain("attention", q, k, v)
    rows = {r.backend: r for r in exp.rows}
    assert rows["small-only"].status == "failed" and "raised while timed" in rows["small-only"].reason
    assert exp.chosen == "reference" and rows["reference"].median_ms is not None
    ref = reference_attention(q.double(), k.double(), v.double(), causal=False, scale=1 / math.sqrt(16),
                              attn_mask=None, return_lse=False)
    assert _max_err(out, ref) < 1e-5


def test_pilot_spares_a_hopeless_kernel_its_full_size_run(gen, plugin):
    """nearest_neighbor's pilot is a sixteenth of the queries: a kernel already 3x slower there than the
    best full-size time is never run on all of them, and is ranked below the others."""
    slow = bad_kernels.SlowPerQueryPlugin()
    plugin(slow, "slowq")
    q, x = torch.rand(1024, 8, generator=gen), torch.rand(4096, 8, generator=gen)
    out = dispatcher.nearest_neighbor(q, x, k=5)
    want = torch.cdist(q.double(), x.double()).topk(5, largest=False)
    assert torch.equal(out.indices, want.indices)
    rows = {r.backend: r for r in dispatcher.explain("nearest_neighbor", q, x, k=5).rows}
    assert rows["slow-per-query"].status == "ok" and rows["slow-per-query"].median_ms is None
    assert "not timed in full" in rows["slow-per-query"].reason
    assert 1024 // 16 in slow.seen and 1024 not in slow.seen  # the pilot, never the whole
    assert dispatcher.explain("nearest_neighbor", q, x, k=5).chosen != "slow-per-query"


def test_a_kernel_right_only_at_small_sizes_is_caught_where_the_reference_is_quick(gen, plugin):
    """The shrunk sample stops at 96 query rows; at 128 rows the reference is still quick, so candidates
    are validated at the caller's size too (the trust rule's "small sample" is for sizes too big)."""
    plugin(bad_kernels.ShortSightedPlugin(), "short")
    q, k, v = _inputs(gen, Lq=128, Lk=128, D=32, Hq=2, Hkv=2, B=1)
    out = dispatcher.attention(q, k, v)
    rows = {r.backend: r for r in dispatcher.explain("attention", q, k, v).rows}
    assert rows["short-sighted"].status == "wrong"
    ref = reference_attention(q.double(), k.double(), v.double(), causal=False, scale=1 / math.sqrt(32),
                              attn_mask=None, return_lse=False)
    assert _max_err(out, ref) < 1e-5


def test_an_untimed_pick_is_not_stored_as_a_tuned_winner(gen, monkeypatch):
    q, k, v = _inputs(gen)
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "off")
    assert "autotuning is off" in dispatcher.explain("attention", q, k, v).why
    dispatcher.reset()  # a new process state: only the cache carries over
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "lazy")
    explanation = dispatcher.explain("attention", q, k, v)
    assert explanation.why.startswith("fastest of") and any(r.median_ms is not None for r in explanation.rows)


def test_a_collective_kernel_failing_without_a_group_falls_back(gen, plugin, monkeypatch):
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "off")  # the flaky kernel wins on priority
    plugin(bad_kernels.FlakyCollectivePlugin(), "flaky")
    x = torch.randn(300_000, generator=gen)  # past the size validated in full, so only the call meets it
    with pytest.warns(dispatcher.DispatchWarning, match="flaky"):
        out = dispatcher.all_reduce(x, op="sum")
    assert torch.equal(out, x)  # a world of one: the sum is the tensor itself


def test_decisions_after_set_num_threads_are_stored_under_the_new_count(gen):
    import json

    from core.cache import FILE_NAME, cache_dir

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, k, v = _inputs(gen, Lq=8, Lk=8, D=8, Hq=1, Hkv=1, B=1)
        dispatcher.attention(q, k, v)
    finally:
        torch.set_num_threads(before)
    data = json.loads((cache_dir() / FILE_NAME).read_text())
    assert any(env["fingerprint"]["threads"] == 1 and env["entries"] for env in data["environments"].values())


def _sparse_cases(gen):
    """(op, argument, the dense call, the same call with that argument sparse) per op."""
    from core.ops.decode_step import make_inputs as decode_inputs
    from core.ops.decode_step import medusa_tree
    from core.ops.split_finding import make_inputs as split_inputs

    q, k, v = _inputs(gen, Lq=4, Lk=6, D=8, Hq=2, Hkv=1, B=1)
    mask = torch.rand(4, 6, generator=gen) > 0.3
    x = torch.randn(40, 30, generator=gen).t()  # non-contiguous: the key a sparse x would share
    db, qs = torch.randn(30, 4, generator=gen), torch.randn(3, 4, generator=gen)
    b, g, h, n = split_inputs(gen, "cpu", n=60, f=3, num_nodes=2, num_bins=8)
    ds = decode_inputs(gen, "cpu", B=1, parents=medusa_tree(4), V=20, rule="greedy")
    d, p, logits = ds.args
    return [
        ("attention", "q", lambda a: dispatcher.attention(a, k, v), q),
        ("attention", "attn_mask", lambda m: dispatcher.attention(q, k, v, attn_mask=m), mask),
        ("precision_cast", "x", lambda a: dispatcher.precision_cast(a, dtype=torch.float16), x),
        ("precision_cast", "x", lambda a: dispatcher.precision_cast(a, dtype=torch.bfloat16), x.contiguous()),
        ("nearest_neighbor", "database", lambda a: dispatcher.nearest_neighbor(qs, a, k=2), db),
        ("split_finding", "grad", lambda a: dispatcher.split_finding(b, a, h, n, num_nodes=2, num_bins=8), g),
        ("decode_step", "target_logits", lambda a: dispatcher.decode_step(d, p, a, rule="greedy"), logits),
        ("all_reduce", "tensors", lambda a: dispatcher.all_reduce(a), x.contiguous()),
    ]


def test_sparse_inputs_get_invalid_input_and_leave_the_key_alone(gen, monkeypatch):
    """A sparse (or CSR) tensor is named in an InvalidInput, before any kernel runs: on a warm key too
    (precision_cast's memo of fast keys), and no kernel is quarantined for the dense calls of that key."""
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "off")  # validated, not timed: the layouts are the point
    for op, arg, call, dense in _sparse_cases(gen):
        want = call(dense)
        call(dense)  # warm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta state"
            layouts = [dense.to_sparse()] + ([dense.to_sparse_csr()] if dense.dim() == 2 else [])
        for sparse in layouts:
            with pytest.raises(InvalidInput, match=f"{op}: argument '{arg}': expected a dense \\(strided\\) tensor"):
                call(sparse)
        with warnings.catch_warnings():
            warnings.simplefilter("error", dispatcher.DispatchWarning)
            got = call(dense)
        for a, w in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, w), op
