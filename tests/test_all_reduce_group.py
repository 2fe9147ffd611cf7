"""all_reduce on real process groups: world sizes 1 to 4 on loopback gloo, spawned by run_local_group.

Each world size's group is started once (a module fixture) and runs every check in ``_checks``; the
tests below read its results. Each group has a timeout, so a hang fails the suite instead of stalling
it. The groups share one fresh tuning cache, in the order 1, 2, 3, 4, so the world of 3 sees the
entries the world of 2 wrote and must not use them.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any

import pytest
import torch

from core import distributed
from core.cache import entry_key

WORLD_SIZES = (1, 2, 3, 4)
KERNELS = ("reference", "torch", "ring", "fused[bucket_mb=1]", "fused[bucket_mb=4]", "fused[bucket_mb=25]")
OPS = ("sum", "avg", "max", "min", "prod")
SEQUENTIAL = 1000
pytestmark = pytest.mark.timeout(900)  # the first test sets up all four groups, each with its own timeout


# -- what every rank runs (module level, so the worker processes can import it) ---------------------

def _digest(out: Any) -> str:
    h = hashlib.sha256()
    for t in (out if isinstance(out, (list, tuple)) else [out]):
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _mixed_200(shared: torch.Generator, mine: torch.Generator) -> list[torch.Tensor]:
    """200 tensors of every dtype and of shapes drawn from ``shared`` (equal on every rank), values from ``mine``."""
    from core.ops.all_reduce import DTYPES, random_values

    out = []
    for i in range(200):
        ndim = int(torch.randint(0, 4, (), generator=shared))
        shape = tuple(int(s) for s in torch.randint(0, 7, (ndim,), generator=shared))
        out.append(random_values(mine, shape, DTYPES[i % len(DTYPES)], "sum", "cpu"))
    return out


def _samples(rank: int, world_size: int) -> dict[str, Any]:
    """Named samples with this rank's own random values; every rank builds the same structures."""
    from core.ops.all_reduce import EDGE_CASES, random_values
    from core.spec import Sample

    mine = torch.Generator().manual_seed(1000 + rank * 7919 + int.from_bytes(os.urandom(2), "little"))
    shared = torch.Generator().manual_seed(42)
    samples = {name: make(mine, "cpu") for name, make in EDGE_CASES.items()}
    shapes = [(17,), (17, 17), (17, 17, 17)]
    for op in OPS:
        ints = [random_values(mine, s, d, op, "cpu") for s, d in zip(shapes, (torch.int32, torch.int64, torch.int32))]
        floats = [random_values(mine, s, d, op, "cpu") for s, d in zip(shapes, (torch.float32, torch.bfloat16, torch.float16))]
        if op != "avg":
            samples[f"ints-17-{op}"] = Sample(args=(ints,), attrs={"op": op, "group": None})
        samples[f"floats-17-{op}"] = Sample(args=(floats,), attrs={"op": op, "group": None})
    samples["mixed-200-sum"] = Sample(args=(_mixed_200(shared, mine),), attrs={"op": "sum", "group": None})
    return samples


def _kernels_on_samples(rank: int, world_size: int) -> dict[str, Any]:
    """Every kernel on every sample: the compare rule's verdict, a digest of the output, inputs untouched."""
    from core import tuning
    from core.ops import get_spec
    from core.spec import Sample
    from registry.loader import get_registry

    spec = get_spec("all_reduce")
    reg = get_registry()
    reference = reg.reference("all_reduce")
    variants = {v.name: v for k in reg.kernels_for("all_reduce") for v in k.variants()}
    gen = torch.Generator().manual_seed(rank)
    failures, digests, touched = [], {}, []
    for name, sample in _samples(rank, world_size).items():
        args, attrs = spec.prepare(sample.args, sample.attrs)
        sample = Sample(args=args, attrs=attrs, name=name)
        keep = [t.clone() for t in (args[0] if isinstance(args[0], (list, tuple)) else [args[0]])]
        exp = tuning.expected(spec, reference, sample, False, gen)
        for kernel in KERNELS:
            out = variants[kernel].fn(*args, **attrs)
            verdict = tuning.judge(spec, out, exp.ref, sample)
            if not verdict.ok:
                failures.append((kernel, name, verdict.reason))
            digests[(kernel, name)] = _digest(out)
        now = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
        if not all(torch.equal(a, b) for a, b in zip(now, keep)):
            touched.append(name)
    return {"failures": failures, "digests": digests, "touched": touched}


def _rank_plus_one(rank: int, world_size: int) -> dict[tuple[str, str, str], list[float]]:
    """Each rank holds [rank + 1] (three elements): every kernel, op and dtype through the dispatcher."""
    from core import dispatcher
    from core.ops.all_reduce import DTYPES

    out = {}
    for kernel in KERNELS:
        with dispatcher.use_backend(kernel):
            for op in OPS:
                for dtype in DTYPES:
                    if op == "avg" and not dtype.is_floating_point:
                        continue
                    x = torch.full((3,), rank + 1, dtype=dtype)
                    out[(kernel, op, str(dtype))] = [float(v) for v in dispatcher.all_reduce(x, op=op)]
    return out


def _sequential(rank: int, world_size: int) -> dict[str, Any]:
    """SEQUENTIAL dispatches in a row (the first tunes the key in lockstep): every answer right."""
    from core import dispatcher

    want = world_size * (world_size + 1) / 2
    wrong = 0
    started = time.perf_counter()
    for i in range(SEQUENTIAL):
        out = dispatcher.all_reduce(torch.full((5,), float(rank + 1 + i)))
        wrong += int(not bool((out == want + world_size * i).all()))
    return {"wrong": wrong, "seconds": time.perf_counter() - started}


def _mismatches(rank: int, world_size: int) -> dict[str, str]:
    """Calls whose structure differs between ranks: every rank must raise, and the group stays usable."""
    from core import dispatcher
    from core.errors import InvalidInput

    last = world_size - 1
    f = torch.ones(17)
    calls = {
        "shape": lambda: dispatcher.all_reduce([f, torch.ones(18) if rank == last else f]),
        "count": lambda: dispatcher.all_reduce([f, f, f] if rank == 1 else [f, f]),
        "dtype": lambda: dispatcher.all_reduce([f, f.double() if rank == last else f]),
        "op": lambda: dispatcher.all_reduce(f, op="max" if rank == 1 else "sum"),
        "invalid-op-on-one-rank": lambda: dispatcher.all_reduce(f, op="mean" if rank == 1 else "sum"),
        "kind": lambda: dispatcher.all_reduce(f if rank == 1 else [f]),
        "avg-of-ints-everywhere": lambda: dispatcher.all_reduce(torch.ones(3, dtype=torch.int32), op="avg"),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
            messages[name] = "no error"
        except InvalidInput as e:
            messages[name] = str(e)
        messages[name + ":after"] = str(float(dispatcher.all_reduce(torch.ones(1))[0]))
    return messages


def _subgroup(rank: int, world_size: int) -> dict[str, Any]:
    """A group of ranks 1..n-1: every kernel over it (ring addresses its peers by global rank), a tuned
    call in lockstep on it, and rank 0, outside it, refused."""
    import torch.distributed as dist

    from core import dispatcher
    from core.errors import InvalidInput

    sub = dist.new_group(list(range(1, world_size)))
    if rank == 0:
        try:
            dispatcher.all_reduce(torch.ones(3), group=sub)
            return {"outside": "no error"}
        except InvalidInput as e:
            return {"outside": str(e)}
    sums = {}
    for kernel in KERNELS:
        with dispatcher.use_backend(kernel):
            sums[kernel] = dispatcher.all_reduce(torch.full((7,), rank + 1, dtype=torch.int64), group=sub).tolist()
    sums["tuned"] = dispatcher.all_reduce(torch.full((7,), rank + 1, dtype=torch.int64), group=sub).tolist()
    return {"sums": sums, "key": list(dispatcher.explain("all_reduce", torch.ones(7, dtype=torch.int64), group=sub).key)}


def _tuning(rank: int, world_size: int) -> dict[str, Any]:
    """Tune a gradient-like key in lockstep; what was decided, what the cache held before, and a re-read."""
    from core import dispatcher
    from core.ops import get_spec
    from core.ops.all_reduce import model_shapes

    spec = get_spec("all_reduce")
    tuner = dispatcher.tuner()
    before = sorted(tuner.cache.entries()) if tuner.cache is not None else []
    gen = torch.Generator().manual_seed(rank)
    grads = [torch.randn(s, generator=gen) for s in model_shapes()[:20]]
    args, attrs = spec.prepare((grads,), {"op": "sum"})
    key = spec.key(args, attrs)
    decision = tuner.decide(spec, key, args, attrs, budget=0.02)
    again = tuner.decide(spec, key, args, attrs, budget=0.02)
    return {"key": list(key), "winner": decision.winner, "source": decision.source, "again": again.source,
            "rows": [(r.backend, r.status, r.median_ms, r.max_error) for r in decision.rows],
            "before": before, "after": sorted(tuner.cache.entries()) if tuner.cache is not None else []}


def _conformance(rank: int, world_size: int) -> list[tuple[str, str, str]]:
    """The conformance kit on the default cases (the edge cases run in _kernels_on_samples); the fused
    kernel's bucket sizes differ only in speed, and the reference is the oracle, so they are left out."""
    from core.ops import get_spec
    from registry.conformance import ConformanceCase, run_case

    spec = get_spec("all_reduce")
    bad = []
    for kernel in ("torch", "ring", "fused[bucket_mb=1]"):
        for case in spec.cases:
            result = run_case(ConformanceCase(op="all_reduce", variant=kernel, case=case))
            if result.status != "ok":
                bad.append((kernel, case, f"{result.status}: {result.reason}"))
    return bad


def _checks(rank: int, world_size: int) -> dict[str, Any]:
    os.environ["SWITCHYARD_TUNE_BUDGET"] = "0.01"  # lazy tuning inside the checks: correctness, not speed
    results: dict[str, Any] = {"timing": {}}
    steps = [("samples", _kernels_on_samples), ("plus_one", _rank_plus_one), ("sequential", _sequential),
             ("tuning", _tuning)]
    if world_size > 1:
        steps.append(("mismatch", _mismatches))
    if world_size > 2:
        steps.append(("subgroup", _subgroup))
    if world_size == 2:
        steps.append(("conformance", _conformance))
    for name, step in steps:
        started = time.perf_counter()
        results[name] = step(rank, world_size)
        results["timing"][name] = time.perf_counter() - started
    return results


# -- the tests -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    cache = tmp_path_factory.mktemp("all-reduce-cache")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWITCHYARD_CACHE_DIR", str(cache))
        for ws in WORLD_SIZES:
            out[ws] = distributed.run_local_group(ws, _checks, timeout=200)
    return out


@pytest.fixture(params=WORLD_SIZES, ids=lambda ws: f"ws{ws}")
def ranks(request: pytest.FixtureRequest, groups: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return groups[request.param]


def test_rank_plus_one_for_every_kernel_op_and_dtype(ranks):
    n = len(ranks)
    want = {"sum": n * (n + 1) / 2, "prod": math.factorial(n), "min": 1, "max": n, "avg": (n + 1) / 2}
    for rank, result in enumerate(ranks):
        for (kernel, op, dtype), values in result["plus_one"].items():
            if op == "avg":  # each contribution is divided by n first: within the compare rule's (n + 2) u
                u = torch.finfo(getattr(torch, dtype.removeprefix("torch."))).eps / 2
                assert all(abs(v - want[op]) <= (n + 2) * u * want[op] for v in values), (rank, kernel, dtype, values)
            else:
                assert values == [want[op]] * 3, (rank, kernel, op, dtype, values)


def test_every_kernel_matches_the_reference_on_every_sample(ranks):
    for rank, result in enumerate(ranks):
        assert result["samples"]["failures"] == [], f"rank {rank}"
        assert result["samples"]["touched"] == [], f"rank {rank}: inputs changed"


def test_every_rank_gets_bitwise_identical_results(ranks):
    digests = [r["samples"]["digests"] for r in ranks]
    assert len(digests[0]) >= 100
    for rank, d in enumerate(digests[1:], start=1):
        differ = sorted(k for k in d if d[k] != digests[0][k])
        assert differ == [], f"rank {rank} differs from rank 0 on {differ}"


def test_many_sequential_all_reduces_are_all_right(ranks):
    for rank, result in enumerate(ranks):
        assert result["sequential"]["wrong"] == 0, f"rank {rank}"


@pytest.mark.parametrize("n", WORLD_SIZES[1:], ids=lambda ws: f"ws{ws}")
def test_mismatched_structure_raises_on_every_rank(groups, n):
    ranks = groups[n]
    expected = {
        "shape": f"tensors[1] has shape (17,) and dtype float32 (device cpu) on rank 0, but shape (18,) and dtype "
                 f"float32 (device cpu) on rank {n - 1}",
        "count": "rank 0 passed 2 tensors, rank 1 passed 3 tensors",
        "dtype": f"tensors[1] has shape (17,) and dtype float32 (device cpu) on rank 0, but shape (17,) and dtype "
                 f"float64 (device cpu) on rank {n - 1}",
        "op": "rank 0 passed op='sum', rank 1 passed op='max'",
        "invalid-op-on-one-rank": "rank 1's call is invalid (all_reduce: argument 'op': expected one of "
                                  "['sum', 'avg', 'max', 'min', 'prod'], got 'mean')",
        "kind": "rank 0 passed a list, rank 1 passed a tensor",
    }
    for rank, result in enumerate(ranks):
        messages = result["mismatch"]
        for name, part in expected.items():
            text = messages[name]
            assert text.startswith("all_reduce: argument 'tensors': expected the same call on every rank"), (rank, text)
            assert part in text, (rank, name, text)
        assert messages["avg-of-ints-everywhere"].startswith("all_reduce: argument 'op': expected 'sum', 'max'")
        for name in [*expected, "avg-of-ints-everywhere"]:
            assert messages[name + ":after"] == str(float(n)), f"the group broke after {name!r}"


def test_tuning_agrees_on_every_rank_and_is_keyed_by_world_size(ranks):
    n = len(ranks)
    tunings = [r["tuning"] for r in ranks]
    first = tunings[0]
    assert first["key"][1] == n and first["key"][2] == "gloo"
    assert first["source"] == "tuned" and first["again"] == "cache"
    assert first["winner"] is not None and first["winner"] != "reference"
    for rank, t in enumerate(tunings[1:], start=1):
        assert (t["key"], t["winner"], t["rows"]) == (first["key"], first["winner"], first["rows"]), f"rank {rank}"
    # the cache entry written is this world size's; a smaller world's entry for the same structure
    # was already there (the groups run in order) and was not used
    assert entry_key("all_reduce", tuple(first["key"])) in first["after"]
    if n > 1:
        smaller = (first["key"][0], n - 1, *first["key"][2:])
        assert entry_key("all_reduce", smaller) in first["before"]


@pytest.mark.parametrize("n", WORLD_SIZES[2:], ids=lambda ws: f"ws{ws}")
def test_a_subgroup_reduces_over_its_members_only(groups, n):
    ranks = groups[n]
    assert ranks[0]["subgroup"]["outside"].startswith("all_reduce: argument 'group': expected a process group this "
                                                      "rank belongs to")
    want = [sum(r + 1 for r in range(1, n))] * 7
    for rank, result in enumerate(ranks[1:], start=1):
        assert result["subgroup"]["sums"] == {k: want for k in [*KERNELS, "tuned"]}, f"rank {rank}"
        assert result["subgroup"]["key"][1] == n - 1


def test_conformance_kit_on_the_default_cases(groups):
    for rank, result in enumerate(groups[2]):
        assert result["conformance"] == [], f"rank {rank}"


def test_report_step_times(groups, capsys):
    with capsys.disabled():
        for ws, ranks in groups.items():
            slowest = {k: max(r["timing"][k] for r in ranks) for k in ranks[0]["timing"]}
            print(f"\n  world {ws}: " + ", ".join(f"{k} {v:.2f}s" for k, v in slowest.items()))
