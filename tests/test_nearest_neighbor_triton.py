"""The fused Triton k-NN kernel's correctness, run by the Triton interpreter on small CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1). Speed is for ``gpu_check`` on a real GPU."""
from __future__ import annotations

import pytest
import torch

from core.ops.nearest_neighbor import SPEC, KnnResult, make_inputs
from core.spec import Sample
from core.tuning import judge
from plugins.fused import _build
from plugins.torch_backend.nearest_neighbor import candidates_per_query
from test_nearest_neighbor import overflow_cases

if _build.triton_reason():
    pytest.skip(f"the Triton kernel cannot run here: {_build.triton_reason()}", allow_module_level=True)

from plugins.fused.triton import nearest_neighbor as tri  # noqa: E402

# Small blocks so a few hundred points make several tiles, several D chunks and two database slices.
SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_D": 16}


def brute(q: torch.Tensor, x: torch.Tensor, k: int, metric: str) -> KnnResult:
    """Every float64 distance, rounded to the dtype, then a stable sort (lower index first on ties)."""
    q64, x64 = q.double(), x.double()
    cost = (q64[:, None] - x64[None]).pow(2).sum(-1) if metric == "l2" else -(q64[:, None] * x64[None]).sum(-1)
    cost = cost.to(q.dtype).double()
    order = torch.sort(cost, dim=1, stable=True).indices[:, :k]
    dist = cost.gather(1, order)
    return KnnResult((dist if metric == "l2" else -dist).to(q.dtype), order)


def _check(out, q, x, k, metric):
    want = brute(q, x, k, metric)
    verdict = judge(SPEC, out, want, Sample(args=(q, x), attrs={"k": k, "metric": metric}))
    assert verdict.ok, verdict.reason
    return want


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_random_data_several_tiles_and_slices(gen, metric):
    q, x = make_inputs(gen, "cpu", torch.float32, 13, 301, 37, hits=3)
    assert tri._splits(13, 301, q.device, SMALL["BLOCK_M"], SMALL["BLOCK_N"]) == 2
    out = tri.nearest_neighbor(q, x, k=6, metric=metric, config=SMALL)
    want = _check(out, q, x, 6, metric)
    assert torch.equal(out.indices, want.indices)


def test_selection_keeps_the_smallest_values_with_a_margin(gen):
    q, x = make_inputs(gen, "cpu", torch.float32, 5, 200, 24)
    cand, worst, margin = tri.select_candidates(q, x, 4, "l2", config=SMALL)
    assert cand.shape == (5, candidates_per_query(4, 200))
    assert bool((cand.sort(dim=1).values.diff(dim=1) > 0).all())  # distinct points
    true = (q.double()[:, None] - x.double()[None]).pow(2).sum(-1)
    kept = torch.zeros_like(true, dtype=torch.bool).scatter_(1, cand, True)
    # every point left out is (up to the margin) no nearer than the farthest candidate kept
    left_out = torch.where(kept, torch.inf, true).amin(dim=1)
    assert bool((left_out >= worst - margin).all())
    assert bool((margin > 0).all()) and bool((margin < 1e-2 * true.amin(dim=1).clamp_min(1)).all())


def test_far_from_the_origin_a_query_on_a_point_is_at_exactly_zero(gen):
    q, x = make_inputs(gen, "cpu", torch.float32, 12, 250, 20, offset=1000.0)
    rows = torch.randperm(250, generator=gen)[:12]
    q = x[rows].clone()
    out = tri.nearest_neighbor(q, x, k=3, metric="l2", config=SMALL)
    assert torch.equal(out.indices[:, 0], rows)
    assert bool((out.distances[:, 0] == 0).all())
    _check(out, q, x, 3, "l2")


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ties_and_duplicates(gen, metric):
    q, x = make_inputs(gen, "cpu", torch.float32, 17, 200, 3, grid=3, hits=4)
    out = tri.nearest_neighbor(q, x, k=7, metric=metric, config=SMALL)
    want = _check(out, q, x, 7, metric)
    assert torch.equal(out.indices, want.indices) and torch.equal(out.distances, want.distances)


def test_more_ties_than_candidates_fall_back_to_the_exact_scan(gen):
    x = torch.randn(150, 8, generator=gen)
    x[40:100] = x[40].clone()  # 60 copies, more than the 20 candidates kept for k=4
    q = x[[70]].clone()
    out = tri.nearest_neighbor(q, x, k=4, metric="l2", config=SMALL)
    assert out.indices[0].tolist() == [40, 41, 42, 43] and out.distances[0].tolist() == [0.0] * 4


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter runs the overflowing products in numpy
@pytest.mark.parametrize("name", list(overflow_cases(torch.Generator(), 300)))
def test_overflowing_products_lose_no_neighbour(gen, name):
    q, x, k, metric = overflow_cases(gen, 300)[name]
    out = tri.nearest_neighbor(q, x, k=k, metric=metric, config=SMALL)
    want = _check(out, q, x, k, metric)
    assert torch.equal(out.indices, want.indices) and torch.equal(out.distances, want.distances)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter runs the overflowing products in numpy
def test_an_overflowed_selection_value_is_kept_as_a_candidate(gen):
    # +inf (|x_c|^2 overflows, 2 q_c.x_c does not) for the true nearest point, index 7: it must be
    # selected, not sorted last behind finite values that certify. (A NaN's sign differs between the
    # CPU interpreter and a GPU, so only the mapping of every non-finite value to -inf makes it portable.)
    q, x, k, metric = overflow_cases(gen, 300)["l2-inf-norm-d16"]
    cand, worst, margin = tri.select_candidates(q, x, k, metric, config=SMALL)
    assert bool((cand == 7).any(dim=1).all())
    y = torch.zeros(40, 16)
    y[:, 0], y[:, 1] = 1e20, -1e20  # every q.x is 1e40 - 1e40: NaN
    q = torch.zeros(1, 16)
    q[0, :2] = 1e20
    cand, worst, margin = tri.select_candidates(q, y, 3, "ip", config=SMALL)
    assert bool((worst == -torch.inf).all())  # only overflowed values kept: the row is never certified
    out = tri.nearest_neighbor(q, y, k=3, metric="ip", config=SMALL)
    assert out.indices.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_subnormal_distances_keep_the_tie_order(gen, metric):
    x = torch.randn(300, 16, generator=gen) * 3e-23
    q = torch.randn(10, 16, generator=gen) * 3e-23
    out = tri.nearest_neighbor(q, x, k=8, metric=metric, config=SMALL)
    want = _check(out, q, x, 8, metric)
    assert torch.equal(out.indices, want.indices)


def test_k_equals_n_m0_and_the_autotuned_launch(gen):
    q, x = make_inputs(gen, "cpu", torch.float32, 3, 21, 5)
    out = tri.nearest_neighbor(q, x, k=21, metric="l2", config=SMALL)
    assert torch.equal(out.indices, brute(q, x, 21, "l2").indices)
    empty = tri.nearest_neighbor(q[:0], x, k=2, metric="l2")
    assert empty.distances.shape == (0, 2) and empty.indices.dtype == torch.int64
    out = tri.nearest_neighbor(q, x, k=4, metric="ip")  # through triton.autotune (one config when interpreting)
    _check(out, q, x, 4, "ip")


_COMPILE = """
import triton
from triton.backends import backends
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from plugins.fused.triton import nearest_neighbor as tri
if "nvidia" not in backends:
    print("SKIP no nvidia backend in this triton")
    raise SystemExit
sig = {"Q": "*fp32", "X": "*fp32", "MEAN": "*fp32", "OUT": "*i64", "M": "i32", "N": "i32", "D": "i32",
       "stride_qm": "i32", "stride_xn": "i32", "stride_om": "i32", "NUM_SPLITS": "i32",
       "IP": "constexpr", "KP": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
big = max(tri.CONFIGS, key=lambda c: (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"] + c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_D"]) * c.num_stages)
src = ASTSource(fn=tri._select_kernel, signature=sig, constexprs={"IP": False, "KP": 128, **big.kwargs})
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": big.num_warps, "num_stages": big.num_stages})
print("OK", kernel.metadata.shared)
"""


def test_the_kernel_compiles_for_an_sm90_gpu_with_its_largest_config():
    """No GPU here: compile (not run) the largest autotune config to a cubin for sm_90, the H100/H200,
    so a kernel that cannot build, or would not fit shared memory, fails in CI."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot compile
    env["PYTHONPATH"] = root
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", _COMPILE], cwd=root, env=env, capture_output=True, text=True,
                            timeout=180)
    if result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0 and result.stdout.startswith("OK"), result.stderr[-3000:]
    assert int(result.stdout.split()[1]) <= 227 * 1024  # the H100/H200 per-block shared memory limit
