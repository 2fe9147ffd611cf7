"""DDP communication hooks on 2 gloo ranks (spawned processes on loopback, one group for every check,
with a timeout so a hang fails instead of stalling the suite).

Every hook trains the same model from the same weights on each rank's own data for STEPS SGD steps
with several gradient buckets (bucket_cap_mb small). Peers: DDP's default reduction, and torch's own
bf16/fp16 compress hooks for ours. Tolerances: float32 rounding for allreduce_hook; for the compress
hooks, each step's averaged gradient may be off by the narrow dtype's unit roundoff per rounding (the
cast, the division, the sum of 2), so parameters may drift by STEPS * lr * 4u * max|grad|.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from core import distributed

STEPS = 5
LR = 0.1
BUCKET_MB = 0.005  # 5 KB: the model below has 32 KB of float32 gradients, its 48 x 48 weights 9 KB each
HOOKS = ("default", "allreduce_hook", "bf16_compress_hook", "fp16_compress_hook", "torch_bf16", "torch_fp16")
UNUSED = ("default", "allreduce_hook", "fp16_compress_hook")  # trained with find_unused_parameters=True
pytestmark = pytest.mark.timeout(300)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    return torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.Tanh(),
                               torch.nn.Linear(48, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.Tanh(),
                               torch.nn.Linear(48, 4))


def _hook(name: str) -> Any:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from core.integrations import ddp

    return {"allreduce_hook": ddp.allreduce_hook, "bf16_compress_hook": ddp.bf16_compress_hook,
            "fp16_compress_hook": ddp.fp16_compress_hook,
            # torch's bf16 hook goes through gloo's bfloat16 all_reduce here; DDP refuses it by name off CUDA
            "torch_bf16": lambda state, bucket: default_hooks.bf16_compress_hook(state, bucket),
            "torch_fp16": default_hooks.fp16_compress_hook}.get(name)


class _Skipping(torch.nn.Module):
    """_model() beside a layer the forward never uses: DDP with find_unused_parameters all-reduces its map
    of used parameters on the group right after the last bucket's hook returns, while the hooks'
    reductions may still be running."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _model()
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _train(rank: int, name: str, unused: bool = False) -> dict[str, Any]:
    import threading

    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_Skipping() if unused else _model(), bucket_cap_mb=BUCKET_MB, find_unused_parameters=unused)
    calls = {"buckets": 0}
    hook = _hook(name)
    if hook is not None:
        def counted(state, bucket):  # unannotated: DDP checks a hook's annotations against its types
            calls["buckets"] += 1
            return hook(state, bucket)
        model.register_comm_hook(None, counted)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    gmax = 0.0
    threads: set[str] = set()
    from core import dispatcher

    reduce = dispatcher.all_reduce

    def where(*args: Any, **attrs: Any) -> Any:  # the thread each of the hooks' reductions runs on
        threads.add(threading.current_thread().name)
        return reduce(*args, **attrs)

    dispatcher.all_reduce = where
    checks: list[Any] = []  # the groups all_reduce's call check ran on while training
    check = distributed.disagreement

    def counted_check(description: str, group: Any) -> Any:
        checks.append(group)
        return check(description, group)

    distributed.disagreement = counted_check
    try:
        for _ in range(STEPS):
            x = torch.randn(8, 16, generator=data)
            y = torch.randn(8, 4, generator=data)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            gmax = max(gmax, max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None))
            opt.step()
    finally:
        dispatcher.all_reduce = reduce
        distributed.disagreement = check
    params = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    return {"params": params, "buckets": calls["buckets"], "gmax": gmax, "threads": sorted(threads),
            "checks": len(checks)}


def _failing(rank: int) -> dict[str, str]:
    """A reduction that raises on the hooks' thread reaches the program as the backward's error; the
    group and the next step are unaffected."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from core import dispatcher
    from core.integrations import ddp

    model = DDP(_model(), bucket_cap_mb=BUCKET_MB)
    model.register_comm_hook(None, ddp.allreduce_hook)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    reduce = dispatcher.all_reduce

    def broken(*args: Any, **attrs: Any) -> Any:
        raise RuntimeError("the reduction broke")

    dispatcher.all_reduce = broken
    try:
        torch.nn.functional.mse_loss(model(x), y).backward()
        out = {"error": "none"}
    except RuntimeError as e:
        out = {"error": str(e)}
    finally:
        dispatcher.all_reduce = reduce
    t = torch.ones(1)
    dist.all_reduce(t)
    out["after"] = str(float(t))
    return out


class _Bucket:
    """A stand-in for dist.GradBucket (which Python cannot construct): DDP itself cannot build a bucket
    of a dtype all_reduce refuses on gloo (float8 parameters fail in DDP's own broadcast, complex ones
    are bucketed as their real view), but a hook must still refuse one without hanging."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return 0


def _unsupported(rank: int) -> dict[str, str]:
    """Every hook refuses a bucket of an unsupported dtype on every rank; the group stays usable."""
    import torch.distributed as dist

    from core.errors import InvalidInput

    out = {}
    for name in ("allreduce_hook", "bf16_compress_hook", "fp16_compress_hook"):
        for dtype in (torch.float8_e4m3fn, torch.complex64, torch.int64):
            case = f"{name}:{str(dtype).removeprefix('torch.')}"
            try:
                _hook(name)(None, _Bucket(torch.ones(6).to(dtype))).wait()
                out[case] = "no error"
            except InvalidInput as e:
                out[case] = str(e)
            t = torch.ones(1)
            dist.all_reduce(t)
            out[case + ":after"] = str(float(t))
    return out


def _checks(rank: int, world_size: int) -> dict[str, Any]:
    import os

    os.environ["SWITCHYARD_TUNE_BUDGET"] = "0.01"  # lazy tuning in lockstep: correctness, not speed
    results: dict[str, Any] = {name: _train(rank, name) for name in HOOKS}
    results["unused"] = {name: _train(rank, name, unused=True) for name in UNUSED}
    results["unsupported"] = _unsupported(rank)
    results["failing"] = _failing(rank)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWITCHYARD_CACHE_DIR", str(tmp_path_factory.mktemp("ddp-cache")))
        return distributed.run_local_group(2, _checks, timeout=240)


def test_several_buckets_go_through_our_hooks(ranks):
    for r in ranks:
        for name in HOOKS[1:]:
            # DDP's first step sends one bucket, then rebuilds them at bucket_cap_mb: at least 3 a step
            assert r[name]["buckets"] >= 1 + 3 * (STEPS - 1), (name, r[name]["buckets"])


def test_every_rank_ends_with_identical_parameters(ranks):
    for name in HOOKS:
        assert torch.equal(ranks[0][name]["params"], ranks[1][name]["params"]), name


def test_allreduce_hook_equals_ddps_default_within_float32_rounding(ranks):
    want = ranks[0]["default"]["params"]
    got = ranks[0]["allreduce_hook"]["params"]
    assert not torch.equal(want, _model_params()), "training moved nothing"
    gmax = ranks[0]["default"]["gmax"]
    bound = STEPS * LR * 4 * (torch.finfo(torch.float32).eps / 2) * gmax + 4 * torch.finfo(torch.float32).eps * float(want.abs().max())
    err = float((got - want).abs().max())
    print(f"allreduce_hook: {err:.3g} from DDP's default (bound {bound:.3g})")
    assert err <= bound


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_compress_hooks_equal_the_default_within_their_dtypes_rounding(ranks, dtype):
    narrow = torch.bfloat16 if dtype == "bf16" else torch.float16
    u = torch.finfo(narrow).eps / 2
    want = ranks[0]["default"]["params"]
    ours = ranks[0][f"{dtype}_compress_hook"]["params"]
    theirs = ranks[0][f"torch_{dtype}"]["params"]
    gmax = max(ranks[0][k]["gmax"] for k in ("default", f"{dtype}_compress_hook"))
    bound = STEPS * LR * 4 * u * gmax
    err, peer_err = float((ours - want).abs().max()), float((theirs - want).abs().max())
    print(f"{dtype}: ours {err:.3g}, torch's hook {peer_err:.3g}, bound {bound:.3g}")
    assert err <= bound, (err, peer_err, bound)
    assert peer_err <= bound, "the bound does not hold for torch's own hook: it is too tight"
    assert err > 0, "the compress hook sent float32"  # the narrow dtype's rounding must show


def test_unsupported_bucket_dtype_raises_invalid_input_on_every_rank(ranks):
    for rank, r in enumerate(ranks):
        for name in ("allreduce_hook", "bf16_compress_hook", "fp16_compress_hook"):
            for dtype in ("float8_e4m3fn", "complex64", "int64"):
                text = r["unsupported"][f"{name}:{dtype}"]
                assert text.startswith(f"ddp.{name}: argument 'bucket': expected a gradient bucket of dtype "
                                       f"float"), (rank, text)
                assert f"got {dtype} (bucket 0" in text, (rank, text)
                assert r["unsupported"][f"{name}:{dtype}:after"] == "2.0", (rank, name, dtype)


def _model_params() -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in _model().parameters()])


def test_hooks_keep_torch_s_signature():
    import inspect

    from core.integrations import ddp

    for hook in (ddp.allreduce_hook, ddp.bf16_compress_hook, ddp.fp16_compress_hook):
        assert list(inspect.signature(hook).parameters) == ["state", "bucket"]


def test_hooks_reduce_on_their_own_thread_while_the_backward_goes_on(ranks):
    for r in ranks:
        for name in ("allreduce_hook", "bf16_compress_hook", "fp16_compress_hook"):
            assert r[name]["threads"] == ["switchyard-ddp-hook"], (name, r[name]["threads"])


def test_the_hooks_private_group_skips_the_call_check(ranks):
    """DDP's buckets are the same on every rank: the hooks' private group is vouched for, and no bucket
    pays all_reduce's call check (a collective each); calls on any other group still do (the all_reduce
    group tests)."""
    for r in ranks:
        for name in ("allreduce_hook", "bf16_compress_hook", "fp16_compress_hook"):
            assert r[name]["buckets"] > 0 and r[name]["checks"] == 0, (name, r[name]["checks"])
        for name in UNUSED[1:]:
            assert r["unused"][name]["checks"] == 0, name


def test_unused_parameters_map_does_not_cross_the_hooks_reductions(ranks):
    # find_unused_parameters: DDP's own all_reduce of the used-parameter map on the default group runs while
    # the hooks' last reductions may be in flight; they run on a private copy of the group, so neither waits
    # on or mixes with the other.
    want = ranks[0]["unused"]["default"]["params"]
    for name in UNUSED[1:]:
        assert torch.equal(ranks[0]["unused"][name]["params"], ranks[1]["unused"][name]["params"]), name
        assert ranks[0]["unused"][name]["threads"] == ["switchyard-ddp-hook"], name
    got = ranks[0]["unused"]["allreduce_hook"]["params"]
    initial = _model_params()
    assert not torch.equal(want[:initial.numel()], initial), "training moved nothing"
    gmax = ranks[0]["unused"]["default"]["gmax"]
    bound = STEPS * LR * 4 * (torch.finfo(torch.float32).eps / 2) * gmax + 4 * torch.finfo(torch.float32).eps * float(want.abs().max())
    assert float((got - want).abs().max()) <= bound
    narrow = ranks[0]["unused"]["fp16_compress_hook"]["params"]
    assert float((narrow - want).abs().max()) <= STEPS * LR * 4 * (torch.finfo(torch.float16).eps / 2) * gmax


def test_a_failing_reduction_is_the_backward_s_error(ranks):
    for rank, r in enumerate(ranks):
        assert "the reduction broke" in r["failing"]["error"], (rank, r["failing"])
        assert r["failing"]["after"] == "2.0", rank
