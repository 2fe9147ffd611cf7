"""The AVX2 builds of the nearest_neighbor, split_finding and decode_step C++ kernels, checked on an
AVX-512 machine: inside ``_build.forced_isa("avx2")`` the fused kernels run the library compiled with
``-march=x86-64-v3 -mno-avx512f`` (its explicit 8-wide paths), judged exactly as the default build is:
against a float64 brute force or the reference, through the op's compare rule, on fresh random inputs
sized to cover the vector loops and their tails."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.ops import decode_step as ds, nearest_neighbor as nn, split_finding as sf
from core.spec import Sample
from core.tuning import judge
from plugins.fused import _build
from plugins.fused.decode_step import decode_step as fused_decode
from plugins.fused.nearest_neighbor import nearest_neighbor as fused_knn, nearest_neighbor_kdtree as fused_kdtree
from plugins.fused.split_finding import split_finding as fused_split
from plugins.reference.decode_step import decode_step as reference_decode
from plugins.reference.split_finding import split_finding as reference_split

ISA = "avx2"
REASON = _build.unavailable_reason()
if REASON is None and ISA not in _build.supported_isas():
    REASON = f"this CPU cannot run the {ISA} level (it runs {list(_build.supported_isas())})"
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the {ISA} build cannot run here: {REASON}")


@pytest.fixture(autouse=True)
def _avx2():
    with _build.forced_isa(ISA):
        yield


def test_the_forced_level_is_the_one_loaded():
    for op in ("nearest_neighbor", "split_finding", "decode_step"):
        assert _build.library(op) is _build.library(op, ISA)
        assert _build.library(op) is not _build.library(op, _build.machine_isa()) or _build.machine_isa() == ISA


# -- nearest_neighbor --------------------------------------------------------------------------------

def _brute(q, x, k, metric):
    """Every float64 distance rounded to the dtype, then a stable sort (independent of the plugins)."""
    q64, x64 = q.double(), x.double()
    cost = (q64[:, None] - x64[None]).pow(2).sum(-1) if metric == "l2" else -(q64[:, None] * x64[None]).sum(-1)
    cost = cost.to(q.dtype).double()
    order = torch.sort(cost, dim=1, stable=True).indices[:, :k]
    dist = cost.gather(1, order)
    return nn.KnnResult((dist if metric == "l2" else -dist).to(q.dtype), order)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("M, N, D, k, dtype", [
    (5, 1500, 3, 4, torch.float32),      # direct formula, one query block, tiles with a tail
    (37, 2100, 8, 10, torch.float32),    # direct formula at its widest D
    (9, 700, 13, 6, torch.float32),      # few queries: the small-M path
    (70, 2600, 33, 7, torch.float32),    # BLAS tiles on centred data
    (3, 1100, 130, 5, torch.float32),    # wide rows, a D that is no multiple of 8
    (12, 900, 21, 3, torch.float64),
])
def test_nearest_neighbor_avx2_matches_a_float64_brute_force(gen, metric, M, N, D, k, dtype):
    q, x = nn.make_inputs(gen, "cpu", dtype, M, N, D, hits=2, offset=float(torch.randn(1, generator=gen)) * 50)
    want = _brute(q, x, k, metric)
    kernels = {"fused": fused_knn, **({"fused-kdtree": fused_kdtree} if metric == "l2" else {})}
    for name, kernel in kernels.items():
        out = kernel(q, x, k=k, metric=metric)
        verdict = judge(nn.SPEC, out, want, Sample(args=(q, x), attrs={"k": k, "metric": metric}))
        assert verdict.ok, f"{name}: {verdict.reason}"
        assert torch.equal(out.indices, want.indices), name  # continuous data: the same neighbours in order


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_nearest_neighbor_avx2_ties_and_duplicates(gen, metric):
    q, x = nn.make_inputs(gen, "cpu", torch.float32, 30, 400, 3, grid=3, hits=5, duplicates=20)
    want = _brute(q, x, 8, metric)
    kernels = [fused_knn] + ([fused_kdtree] if metric == "l2" else [])
    for kernel in kernels:
        out = kernel(q, x, k=8, metric=metric)
        verdict = judge(nn.SPEC, out, want, Sample(args=(q, x), attrs={"k": 8, "metric": metric}))
        assert verdict.ok, verdict.reason



@pytest.mark.parametrize("D", [16, 24])
def test_nearest_neighbor_avx2_few_queries_whose_distances_overflow(gen, D):
    # every distance but each query's own overflows float32 (inf, ties by index): the transposed direct
    # tiles' guarded scan, whose candidate bits come from AVX2 compares here (the tail from the plain loop)
    x = torch.randn(1500, D, generator=gen) * 1e24 + 1e25
    q = x[[3, 700, 1499]].clone()
    want = _brute(q, x, 4, "l2")
    out = fused_knn(q, x, k=4, metric="l2")
    assert torch.equal(out.indices, want.indices) and torch.equal(out.distances, want.distances)
    assert out.distances[:, 0].eq(0).all() and out.distances[:, 1:].isinf().all()

# -- split_finding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, f, nodes, bins, dtype, id_dtype", [
    (3000, 5, 1, 255, torch.float32, torch.int32),
    (2500, 7, 4, 40, torch.float64, torch.int64),
    (20000, 3, 3, 17, torch.float32, torch.int64),
])
def test_split_finding_avx2_matches_the_reference(gen, n, f, nodes, bins, dtype, id_dtype):
    args = sf.make_inputs(gen, "cpu", n=n, f=f, num_nodes=nodes, num_bins=bins, dtype=dtype, id_dtype=id_dtype)
    attrs = {"num_nodes": nodes, "num_bins": bins, "reg_lambda": 1.0, "reg_alpha": 0.2, "gamma": 0.0,
             "min_child_weight": 1.0}
    want = reference_split(*args, **attrs)
    out = fused_split(*args, **attrs)
    verdict = judge(sf.SPEC, out, want, Sample(args=args, attrs=attrs))
    assert verdict.ok, verdict.reason
    assert torch.equal(out.feature, want.feature) and torch.equal(out.threshold, want.threshold)


# -- decode_step -------------------------------------------------------------------------------------

# V spans several 2048-entry blocks and leaves a tail that no vector width divides.
DECODE_CASES = {
    "greedy-tree": dict(B=3, parents=ds.medusa_tree(16), V=4109, rule="greedy"),
    "typical-tree": dict(B=3, parents=ds.medusa_tree(16), V=4109, rule="typical", temperature=0.7),
    "typical-peaky": dict(B=2, parents=ds.medusa_tree(12), V=2053, rule="typical", scale=40.0),
    "typical-t0": dict(B=2, parents=ds.medusa_tree(12), V=2053, rule="typical", temperature=0.0),
    "rejection": dict(B=5, parents=ds.chain(4), V=6151, rule="rejection"),
    "rejection-hot": dict(B=4, parents=ds.chain(3), V=1031, rule="rejection", temperature=1.7),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_step_avx2_passes_the_compare_rule(gen, case, dtype):
    sample = ds.make_inputs(gen, "cpu", dtype=dtype, **DECODE_CASES[case])
    args, attrs = ds.SPEC.prepare(sample.args, sample.attrs)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    out = fused_decode(*args, **{**attrs, "generator": torch.Generator().manual_seed(seed)})
    want = reference_decode(*args, **{**attrs, "generator": torch.Generator().manual_seed(seed)})
    verdict = judge(ds.SPEC, out, want, Sample(args=args, attrs=attrs))
    assert verdict.ok, verdict.reason
    if DECODE_CASES[case]["rule"] == "greedy" or DECODE_CASES[case].get("temperature") == 0.0:
        for a, b in zip(out, want):
            assert torch.equal(a, b)


def test_decode_step_avx2_masked_vocabulary_never_emits_a_masked_token(gen):
    """-inf logits (every third id) and zeros in q (every third id, shifted): exp of -inf is exactly 0 in
    the 8-wide exp, so no sampled or accepted token may have p = 0 or q = 0."""
    B, parents, V = 400, ds.chain(3), 1043
    logits = torch.randn(B, len(parents), V, generator=gen) * 2
    logits[..., ::3] = float("-inf")
    q = torch.softmax(torch.randn(B, len(parents), V, generator=gen), -1)
    q[..., 1::3] = 0
    q = q / q.sum(-1, keepdim=True)
    drafts = torch.randint(0, V, (B, len(parents)), generator=gen)
    for rule, extra in (("rejection", {"draft_probs": q}), ("typical", {})):
        args, attrs = ds.SPEC.prepare((drafts, torch.tensor(parents), logits),
                                      {"rule": rule, "generator": torch.Generator().manual_seed(3), **extra})
        out = fused_decode(*args, **attrs)
        emitted = out.tokens[out.tokens >= 0]
        assert not bool((emitted % 3 == 0).any()), rule
        if rule == "rejection":  # an accepted draft had q > 0
            accepted = torch.arange(out.tokens.shape[1])[None] < out.num_accepted[:, None]
            assert not bool((out.tokens[accepted] % 3 == 1).any())


def test_decode_step_avx2_typical_extra_token_follows_p(gen):
    """A root-only tree over 50,000 rows: the sampled extra tokens follow p = softmax(logits / 0.8) (the
    8-wide exp feeds the inverse CDF); chi-square p-value above 1e-6."""
    from scipy import stats

    N, V = 50_000, 21  # two 8-wide steps and a tail of 5
    target = torch.randn(V, generator=gen) * 2
    args, attrs = ds.SPEC.prepare((torch.zeros(N, 1, dtype=torch.int64), torch.tensor([-1]),
                                   target.expand(N, 1, V).contiguous()),
                                  {"rule": "typical", "temperature": 0.8, "generator": torch.Generator().manual_seed(5)})
    out = fused_decode(*args, **attrs)
    p = torch.softmax(target.double() / 0.8, 0).numpy()
    counts = np.bincount(out.tokens[:, 0].numpy(), minlength=V)
    assert len(counts) == V
    assert stats.chisquare(counts, p * N).pvalue > 1e-6
