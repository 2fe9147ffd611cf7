"""The dispatcher inside torch.compile(fullgraph=True): every op with the eager, aot_eager and inductor
backends, no graph break, compiled == eager; dynamic shapes over several dispatch-key buckets with one
compile; bad input raises InvalidInput from the compiled graph; all_reduce is eager-only."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo

from core import dispatcher
from core.errors import InvalidInput
from core.ops.attention import make_inputs, random_mask
from core.ops.decode_step import chain, medusa_tree
from core.ops.decode_step import make_inputs as decode_inputs
from core.ops.split_finding import make_inputs as split_inputs
from core.spec import bucket

BACKENDS = ("eager", "aot_eager", "inductor")


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.setenv("SWITCHYARD_TUNE_BUDGET", "0.005")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _cases(gen: torch.Generator) -> dict[str, tuple]:
    """(function, inputs) per op: each calls the dispatcher as user code does, then touches the result."""
    q, k, v = make_inputs(gen, "cpu", torch.float32, 2, 4, 2, 6, 9, 16)
    mask = random_mask(gen, (2, 1, 6, 9), "cpu")
    bins, grad, hess, node_ids = split_inputs(gen, "cpu", n=300, f=4, num_nodes=3, num_bins=32)
    ds = decode_inputs(gen, "cpu", B=2, parents=medusa_tree(8), V=50, rule="greedy")
    x = torch.randn(500, generator=gen)
    db, qs = torch.randn(200, 8, generator=gen), torch.randn(7, 8, generator=gen)
    return {
        "attention": (lambda q, k, v, m: dispatcher.attention(q, k, v, causal=True, attn_mask=m) * 2, (q, k, v, mask)),
        "attention-lse": (lambda q, k, v: dispatcher.call("attention", q, k, v, return_lse=True), (q, k, v)),
        "precision_cast": (lambda x: dispatcher.precision_cast(x, dtype=torch.float8_e4m3fn, scaling="amax",
                                                               saturate=True), (x,)),
        "split_finding": (lambda b, g, h, n: dispatcher.split_finding(b, g, h, n, num_nodes=3, num_bins=32),
                          (bins, grad, hess, node_ids)),
        "nearest_neighbor": (lambda a, b: dispatcher.call("nearest_neighbor", a, b, k=5), (qs, db)),
        "decode_step": (lambda d, p, t: dispatcher.decode_step(d, p, t, rule="greedy"), ds.args),
    }


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_compiles_fullgraph_and_equals_eager(backend, gen):
    for name, (fn, args) in _cases(gen).items():
        want = fn(*args)
        got = torch.compile(fn, fullgraph=True, backend=backend)(*args)
        assert type(got) is type(want), name  # the records (CastResult, ...) rebuilt around the op's outputs
        for g, w in zip(_flat(got), _flat(want)):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=name)


def test_zero_graph_breaks(gen):
    for name, (fn, args) in _cases(gen).items():
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_break_count == 0, (name, explanation.break_reasons)
        assert explanation.graph_count == 1, name


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_attention_gradients_compiled_equal_eager(backend, gen):
    q, k, v = make_inputs(gen, "cpu", torch.float32, 2, 4, 2, 8, 8, 16)
    mask = random_mask(gen, (1, 1, 8, 8), "cpu", dead_row=False)
    go = torch.randn(2, 4, 8, 16, generator=gen)

    def loss(q, k, v):
        return (dispatcher.attention(q, k, v, causal=True, attn_mask=mask) * go).sum()

    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(loss(*eager), eager)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend=backend)(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_a_compiled_training_step_tunes_a_new_grad_key(gen, monkeypatch, tmp_path):
    """A compiled graph is the first to meet the key (a fresh process state, an empty cache): the op's
    implementation runs below autograd, and the tuner still validates gradients there."""
    monkeypatch.setenv("SWITCHYARD_CACHE_DIR", str(tmp_path))
    dispatcher.reset()
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 2, 1, 5, 7, 8)
    go = torch.randn(1, 2, 5, 8, generator=gen)

    def loss(q, k, v):
        return (dispatcher.attention(q, k, v, causal=True) * go).sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))  # float64 math, bottom-right causal, GQA
    s = q64 @ k64.expand(1, 2, 7, 8).transpose(-1, -2) * 8 ** -0.5
    s = s.masked_fill(torch.ones(5, 7, dtype=torch.bool).tril(7 - 5).logical_not(), float("-inf"))
    ref = s.softmax(-1) @ v64.expand(1, 2, 7, 8)
    want = torch.autograd.grad((ref * go.double()).sum(), (q64, k64, v64))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    dispatcher.reset()


def test_ops_without_a_gradient_compile_on_inputs_that_require_one(gen):
    """As in eager calls: the cast, k-NN and split finding have no gradient, so a compiled function that
    calls them on tensors requiring grad compiles and returns outputs that do not require grad."""
    x = torch.randn(300, generator=gen, requires_grad=True)
    db, qs = torch.randn(50, 4, generator=gen, requires_grad=True), torch.randn(3, 4, generator=gen)

    def fn(x, db, qs):
        return dispatcher.precision_cast(x * 2, dtype=torch.bfloat16), dispatcher.nearest_neighbor(qs, db, k=2)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no autograd fallback warns on the way
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, db, qs)
    want = fn(x, db, qs)
    for g, w in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        assert not g.requires_grad
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_dynamic_lengths_compile_once_and_tune_per_bucket(gen):
    lengths = (5, 12, 40, 100)  # buckets 8, 16, 64, 128
    fn = torch.compile(lambda q, k, v: dispatcher.attention(q, k, v, causal=True), fullgraph=True, backend="eager",
                       dynamic=True)
    inputs = [make_inputs(gen, "cpu", torch.float32, 1, 2, 2, n, n, 16) for n in lengths]
    fn(*inputs[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for (q, k, v), n in zip(inputs, lengths):
            got = fn(q, k, v)
            with dispatcher.use_backend("reference"):
                want = dispatcher.attention(q.double(), k.double(), v.double(), causal=True)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    keys = [key for (op, key) in dispatcher._state.choices if op == "attention" and key[2:4] == (1, 2)
            and key[7] == 16]
    assert {bucket(n) for n in lengths} <= {key[5] for key in keys}  # each bucket decided at run time


def test_bad_input_raises_invalid_input_inside_compiled_graphs(gen):
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 4, 2, 5, 7, 8)
    x = torch.randn(10, generator=gen)
    cases = [
        (lambda q, k, v: dispatcher.attention(q, k[..., :4], v), (q, k, v),
         r"attention: argument 'k': expected head dim 8 \(the head dim of q\), got 4"),
        (lambda q, k, v: dispatcher.attention(q, k, v, scale="big"), (q, k, v),
         r"attention: argument 'scale': expected a finite float or None, got 'big'"),
        (lambda q, k, v: dispatcher.attention(q, k, v, attn_mask=torch.zeros(5, 7)), (q, k, v),
         r"attention: argument 'attn_mask': expected dtype torch.bool"),
        (lambda x: dispatcher.precision_cast(x, dtype=torch.int8).y, (x,),
         r"precision_cast: argument 'dtype': expected one of"),
        (lambda x: dispatcher.precision_cast(x, dtype=torch.float16, rounding="up").y, (x,),
         r"precision_cast: argument 'rounding': expected one of \['nearest', 'stochastic'\], got 'up'"),
        (lambda x: dispatcher.precision_cast(x, dtype=torch.float16, colour=1).y, (x,),
         r"precision_cast: argument 'colour': expected one of the attributes"),
        (lambda a, b: dispatcher.nearest_neighbor(a, b, k=11).indices, (x[:6].view(3, 2), x.view(5, 2)),
         r"nearest_neighbor: argument 'k': expected 1 <= k <= N = 5"),
    ]
    for fn, args, message in cases:
        for backend in ("eager", "inductor"):
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True, backend=backend)
            for _ in range(2):  # the same graph raises again: no recompile loop
                with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(InvalidInput, match=message):
                    compiled(*args)


def test_value_checks_run_at_run_time_inside_compiled_graphs(gen):
    db = torch.randn(20, 3, generator=gen)
    db[7, 1] = float("nan")
    compiled = torch.compile(lambda a, b: dispatcher.nearest_neighbor(a, b, k=2), fullgraph=True, backend="aot_eager")
    with pytest.raises(InvalidInput, match=r"nearest_neighbor: argument 'database': expected finite values, got nan "
                                           r"in row 7 \(column 1\)"):
        compiled(torch.randn(4, 3, generator=gen), db)
    ds = decode_inputs(gen, "cpu", B=2, parents=chain(3), V=10, rule="greedy")
    tokens, parents, logits = ds.args
    bad = torch.tensor([-1, 0, 3, 1])
    step = torch.compile(lambda d, p, t: dispatcher.decode_step(d, p, t).tokens, fullgraph=True, backend="eager")
    with pytest.raises(InvalidInput, match=r"decode_step: argument 'parents': expected 0 <= parents\[2\] < 2"):
        step(tokens, bad, logits)
    got = step(tokens, parents, logits)  # and a good call of the same graph works
    assert torch.equal(got, dispatcher.decode_step(tokens, parents, logits).tokens)


def test_forced_backend_reaches_the_compiled_op(gen):
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 2, 2, 4, 4, 8)
    compiled = torch.compile(lambda q, k, v: dispatcher.attention(q, k, v), fullgraph=True, backend="eager")
    calls = []
    with dispatcher.use_backend("reference"):
        from registry import loader

        ref = loader.get_registry().reference("attention")
        original = ref.fn
        try:
            object.__setattr__(ref, "fn", lambda *a, **kw: calls.append(1) or original(*a, **kw))
            dispatcher.reset()
            compiled(q, k, v)
        finally:
            object.__setattr__(ref, "fn", original)
            dispatcher.reset()
    assert calls  # use_backend (a ContextVar) is read at run time, inside the op


def test_all_reduce_is_eager_only(gen):
    x = torch.randn(6, generator=gen)
    fn = lambda t: dispatcher.all_reduce(t) * 2  # noqa: E731
    with pytest.raises(Exception, match=r"all_reduce is eager-only under torch.compile"):
        torch.compile(fn, fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, backend="eager")(x), x * 2)  # without fullgraph: a graph break


def test_transformers_model_with_a_padding_mask_compiles(gen):
    transformers = pytest.importorskip("transformers")
    from core.integrations import transformers as integration

    name = integration.register()
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = name
    ids = torch.randint(0, 97, (2, 12), generator=gen)
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[1, :3] = 0  # left padding: the model's bool mask reaches dispatcher.attention
    fn = lambda ids, pad: model(input_ids=ids, attention_mask=pad).logits  # noqa: E731
    with torch.no_grad():
        want = fn(ids, pad)
        assert torch._dynamo.explain(fn)(ids, pad).graph_break_count == 0
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(ids, pad)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
