"""all_reduce in one process: a world of one, bad input, the compare rule, the fused buckets, and run_local_group.

What needs several ranks (every op on every world size, structure mismatches, lockstep tuning) is in
tests/test_all_reduce_group.py.
"""
from __future__ import annotations

import math
import time

import pytest
import torch

from core import dispatcher, distributed
from core.errors import InvalidInput
from core.ops.all_reduce import DTYPES, SPEC, model_shapes
from core.spec import Sample
from plugins.fused.all_reduce import buckets
from registry.conformance import check_case, conformance_cases

KERNELS = ("reference", "torch", "ring", "fused[bucket_mb=1]", "fused[bucket_mb=4]", "fused[bucket_mb=25]")


def _mixed(gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    for i, dtype in enumerate(DTYPES):
        base = torch.randn(5, 3 + i, generator=gen) * 100
        out.append(base.to(dtype))
    out.append(torch.randn(4, 6, generator=gen).t())  # non-contiguous
    out.append(torch.empty(0, 3))
    return out


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("op", ["sum", "avg", "max", "min", "prod"])
def test_world_of_one_returns_equal_new_tensors(gen, backend, op):
    items = [t for t in _mixed(gen) if t.is_floating_point() or op != "avg"]
    before = [t.clone() for t in items]
    with dispatcher.use_backend(backend):
        out = dispatcher.all_reduce(items, op=op)
    assert isinstance(out, list) and len(out) == len(items)
    for o, t, b in zip(out, items, before):
        assert o.dtype == t.dtype and o.shape == t.shape
        assert torch.equal(o, t)
        assert o.data_ptr() != t.data_ptr() or t.numel() == 0
        assert torch.equal(t, b)  # the input is left alone
    with dispatcher.use_backend(backend):
        single = dispatcher.all_reduce(items[0], op=op)
        pair = dispatcher.all_reduce(tuple(items[:2]), op=op)
    assert isinstance(single, torch.Tensor) and torch.equal(single, items[0])
    assert isinstance(pair, tuple) and len(pair) == 2


def test_outputs_are_writable_without_touching_inputs(gen):
    x = torch.randn(3, 4, generator=gen)
    keep = x.clone()
    out = dispatcher.all_reduce(x)
    out.add_(1)
    assert torch.equal(x, keep)


def test_dispatcher_tunes_and_explains_a_world_of_one(gen):
    grads = [torch.randn(s, generator=gen) for s in model_shapes()[:20]]
    out = dispatcher.all_reduce(grads)
    assert all(torch.equal(o, g) for o, g in zip(out, grads))
    exp = dispatcher.explain("all_reduce", grads)  # op="sum" by default (explain(op=...) collides: see the report)
    assert exp.key[:4] == ("cpu", 1, "none", "sum")
    assert exp.chosen in {r.backend for r in exp.rows if r.status == "chosen"}
    assert {r.backend for r in exp.rows} == set(KERNELS)
    assert all(r.status in ("ok", "chosen") for r in exp.rows), exp.table()


BAD = [
    (lambda x: ((3.0,), {}), "argument 'tensors': expected a tensor or a list of tensors, got float"),
    (lambda x: (([x, "y"],), {}), "argument 'tensors': expected a list of tensors, got str at index 1"),
    (lambda x: (([x, x.bool()],), {}), "expected dtype one of ['float16', 'bfloat16', 'float32', 'float64', 'int32', "
                                       "'int64'], got bool at index 1"),
    (lambda x: ((x.to(torch.complex64),), {}), "got complex64"),
    (lambda x: ((x.to_sparse(),), {}), "expected a dense (strided) tensor, got layout torch.sparse_coo"),
    (lambda x: (([x, x.to("meta")],), {}), "expected every tensor on device 'cpu' (that of the first), got 'meta' at index 1"),
    (lambda x: ((x,), {"op": "mean"}), "argument 'op': expected one of ['sum', 'avg', 'max', 'min', 'prod'], got 'mean'"),
    (lambda x: ((x,), {"op": None}), "argument 'op': expected one of"),
    (lambda x: (([x, x.long()],), {"op": "avg"}), "argument 'op': expected 'sum', 'max', 'min' or 'prod' for integer "
                                                  "tensors (their average is not an integer), got 'avg' with int64 at index 1"),
    (lambda x: ((x,), {"group": "world"}), "argument 'group': expected None (torch.distributed is not initialized, so "
                                           "the world is this process alone), got str"),
    (lambda x: ((x,), {"grop": None}), "argument 'grop': expected one of the attributes"),
]


@pytest.mark.parametrize("make, message", BAD)
def test_bad_input_names_op_argument_and_values(make, message):
    args, attrs = make(torch.randn(4, 3))
    with pytest.raises(InvalidInput) as info:
        dispatcher.all_reduce(*args, **attrs)
    assert message in str(info.value)
    assert str(info.value).startswith("all_reduce")


def test_key_has_world_size_backend_op_and_structure(gen):
    a = SPEC.key(([torch.randn(100), torch.randn(3, dtype=torch.float64)],), {"op": "sum", "group": None})
    b = SPEC.key(([torch.randn(120), torch.randn(2, dtype=torch.float64)],), {"op": "sum", "group": None})
    c = SPEC.key(([torch.randn(100), torch.randn(3)],), {"op": "sum", "group": None})
    d = SPEC.key(([torch.randn(100), torch.randn(3, dtype=torch.float64)],), {"op": "max", "group": None})
    e = SPEC.key(([torch.randn(5000), torch.randn(3, dtype=torch.float64)],), {"op": "sum", "group": None})
    assert a == b  # same count bucket, dtypes and size bucket
    assert a[:3] == ("cpu", 1, "none")
    assert len({a, c, d, e}) == 4


# -- the compare rule ------------------------------------------------------------------------------

def _judge(out, ref_inputs, op):
    """The compare rule on ``out`` against the reference run on the oracle of ``ref_inputs`` (one rank)."""
    from plugins.reference.all_reduce import all_reduce as reference

    sample = Sample(args=(ref_inputs,), attrs={"op": op, "group": None})
    oracle = SPEC.oracle(sample)
    return SPEC.compare(out, reference(*oracle.args, **oracle.attrs), sample)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_compare_rule_accepts_its_bound_and_rejects_beyond(gen, dtype):
    x = torch.randn(1000, generator=gen).to(dtype)
    eps = torch.finfo(dtype).eps
    # n = 1: the bound is (1 + 2) u S + tau (+ the float64 term) = 1.5 eps |x| + ..., with S = |x|;
    # 0.5 eps |x| plus half an ulp of rounding (an ulp is at most eps |x|) is at most eps |x|
    within = (x.double() * (1 + 0.5 * eps)).to(dtype)
    assert _judge([within], [x], "sum").ok
    beyond = x.clone()
    beyond[7] = (x[7].double() * (1 + 4 * eps) + math.copysign(4 * eps, float(x[7]))).to(dtype)
    verdict = _judge([beyond], [x], "sum")
    assert not verdict.ok
    assert "tensors[0]" in verdict.reason and "element 7" in verdict.reason and "bound" in verdict.reason


def test_compare_rule_is_exact_for_integers_and_max(gen):
    x = torch.randint(-1000, 1000, (50,), generator=gen)
    off = x.clone()
    off[3] += 1
    assert _judge([x.clone()], [x], "sum").ok
    verdict = _judge([off], [x], "sum")
    assert not verdict.ok and "element 3" in verdict.reason and "exact" in verdict.reason
    y = torch.randn(20, generator=gen)
    nudged = y.clone()
    nudged[0] = torch.nextafter(y[0], torch.tensor(math.inf))
    assert not _judge([nudged], [y], "max").ok
    assert _judge([y.clone()], [y], "max").ok


def test_compare_rule_allows_overflow_only_where_the_magnitudes_overflow():
    big = torch.tensor([60000.0, 60000.0, 1.0], dtype=torch.float16)
    # one rank: S = |x| is finite, so an inf is wrong ...
    assert not _judge([torch.tensor([math.inf, 60000.0, 1.0], dtype=torch.float16)], [big], "sum").ok
    # ... and where the reference itself is inf, the output must be that inf
    inf = torch.tensor([math.inf, -math.inf], dtype=torch.float16)
    assert _judge([inf.clone()], [inf], "sum").ok
    assert not _judge([torch.tensor([math.inf, 0.0], dtype=torch.float16)], [inf], "sum").ok


def test_compare_rule_checks_empty_lists_and_shapes():
    verdict = _judge([], [], "sum")
    assert verdict.ok
    from core.tuning import judge

    x = torch.ones(3)
    sample = Sample(args=([x],), attrs={"op": "sum", "group": None})
    assert not judge(SPEC, [torch.ones(4)], [x.double(), x.double()], sample).ok


# -- the fused kernel's buckets --------------------------------------------------------------------

def test_buckets_group_per_dtype_in_order_within_the_size():
    f = [torch.empty(256) for _ in range(5)]  # 1 KB each
    d = [torch.empty(64, dtype=torch.float64) for _ in range(3)]  # 512 B each
    items = [f[0], d[0], f[1], f[2], d[1], torch.empty(0), f[3], d[2], torch.empty(2000), f[4]]
    got = buckets(items, 2048)
    assert sorted(i for b in got for i in b) == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # every non-empty tensor once
    for b in got:
        assert len({items[i].dtype for i in b}) == 1
        assert b == sorted(b)
        size = sum(items[i].numel() * items[i].element_size() for i in b)
        assert size <= 2048 or len(b) == 1  # only a tensor larger than a bucket gets one alone
    assert [0, 2] in got and [8] in got


@pytest.mark.parametrize("bucket_mb", [1e-4, 0.002, 1])
def test_fused_with_small_buckets_still_equals_the_input(gen, bucket_mb):
    from plugins.fused.all_reduce import fused

    items = _mixed(gen)
    out = fused(items, op="sum", group=None, bucket_mb=bucket_mb)
    assert all(torch.equal(o, t) and o.shape == t.shape for o, t in zip(out, items))


# -- every built-in kernel, every case, through the conformance kit (a world of one) ---------------

BUILTIN = [c for backend in ("reference", "torch", "ring", "fused") for c in conformance_cases(backend, ops=["all_reduce"])]


@pytest.mark.parametrize("case", BUILTIN, ids=str)
def test_builtin_kernels_conform(case):
    check_case(case)


# -- run_local_group -------------------------------------------------------------------------------

def _echo(rank, world_size, tag):
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return tag, rank, world_size, float(t), dist.get_backend()


def _raise_on_rank_one(rank, world_size):
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank one is broken on purpose")
    dist.barrier()  # rank 0 would wait here forever: the parent must kill it


def _sleep(rank, world_size):
    time.sleep(600)


def test_run_local_group_returns_in_rank_order():
    got = distributed.run_local_group(3, _echo, "hello", timeout=60)
    assert got == [("hello", r, 3, 3.0, "gloo") for r in range(3)]


def test_run_local_group_names_the_failing_rank_and_its_traceback():
    with pytest.raises(distributed.LocalGroupError) as info:
        distributed.run_local_group(2, _raise_on_rank_one, timeout=60)
    text = str(info.value)
    assert "rank 1 of 2 raised" in text and "ValueError: rank one is broken on purpose" in text
    assert "_raise_on_rank_one" in text  # the traceback


def test_run_local_group_times_out_instead_of_hanging():
    started = time.monotonic()
    with pytest.raises(distributed.LocalGroupError) as info:
        distributed.run_local_group(2, _sleep, timeout=3)
    assert "did not finish within 3 s" in str(info.value) and "[0, 1]" in str(info.value)
    assert time.monotonic() - started < 20


def test_init_from_env_is_false_without_a_launcher(monkeypatch):
    for var in distributed.LAUNCHER_ENV:
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_from_env() is False
    assert not distributed.initialized()


# -- python -m core.autotune --ops all_reduce (in this process; it starts its own local groups) ----

def test_autotune_cli_tunes_in_a_local_group_keyed_by_world_size(tmp_path, monkeypatch, capsys):
    import json

    from core import autotune

    monkeypatch.setenv("SWITCHYARD_CACHE_DIR", str(tmp_path))
    for var in distributed.LAUNCHER_ENV:
        monkeypatch.delenv(var, raising=False)
    for ws in (2, 3):
        rows_path = tmp_path / f"rows{ws}.json"
        code = autotune.main(["--ops", "all_reduce", "--cases", "i64-64k-max", "--budget", "0.02",
                              "--world-size", str(ws), "--json", str(rows_path)])
        assert code == 0
        rows = json.loads(rows_path.read_text())
        assert {r["backend"] for r in rows} == set(KERNELS)
        assert all(r["status"] in ("ok", "chosen") for r in rows), rows
        assert [r["key"][1:3] for r in rows][0] == [ws, "gloo"]
        assert sum(r["status"] == "chosen" for r in rows) == 1
    assert "== all_reduce" in capsys.readouterr().out
    (env,) = json.loads((tmp_path / "tuning-cache.json").read_text())["environments"].values()
    keys = [json.loads(k.split("|", 1)[1]) for k in env["entries"]]
    assert sorted(k[1] for k in keys) == [2, 3]  # one entry per world size, never shared
