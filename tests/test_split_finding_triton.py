"""The Triton split-finding kernels, run by the Triton interpreter on CPU tensors (TRITON_INTERPRET=1,
set by conftest) at small sizes: correctness only; speed is the GPU check's business."""
from __future__ import annotations

import pytest
import torch

from core.ops.split_finding import SPEC, make_inputs
from core.spec import Sample
from core.tuning import judge
from plugins.reference.split_finding import split_finding as reference
from test_split_finding import _assert_same_as_brute_force, _attrs, brute_force

triton_split = pytest.importorskip("plugins.fused.triton.split_finding", reason="triton is not installed").split_finding


@pytest.mark.parametrize("params", [{}, {"reg_alpha": 0.4, "reg_lambda": 0.0, "min_child_weight": 0.0, "gamma": 0.2}])
def test_triton_matches_brute_force(gen, params):
    bins, grad, hess, ids = make_inputs(gen, "cpu", n=90, f=3, num_nodes=3, num_bins=6, missing=0.15, inactive=0.1,
                                        dtype=torch.float64)
    attrs = _attrs(num_nodes=3, num_bins=6, **params)
    out = triton_split(bins, grad, hess, ids, **attrs, copies=2)
    _assert_same_as_brute_force(out, brute_force(bins, grad, hess, ids, **attrs))


def test_triton_tie_order(gen):
    x = torch.randint(0, 4, (64,), generator=gen)
    bins = torch.stack([x, x], dim=1).to(torch.uint8)
    grad = torch.where(x >= 2, 1.0, -1.0)
    out = triton_split(bins, grad, torch.ones(64), torch.zeros(64, dtype=torch.int32), **_attrs(num_nodes=1, num_bins=6),
                       copies=4)
    assert (int(out.feature[0]), int(out.threshold[0]), bool(out.default_left[0])) == (0, 1, False)


@pytest.mark.parametrize("case", ["empty-nodes", "degenerate-features", "float64-int64-ids", "many-missing",
                                  "lambda0-mcw0-zero-hess", "no-rows", "one-bin"])
def test_triton_edge_cases_pass_the_compare_rule(gen, case):
    sample = SPEC.edge_cases[case](gen, "cpu")
    attrs = dict(sample.attrs)
    SPEC.verify(sample.args, attrs)
    out = triton_split(*sample.args, **attrs, copies=3)  # several private copies, merged by the scan
    verdict = judge(SPEC, out, reference(*sample.args, **attrs), Sample(args=sample.args, attrs=attrs))
    assert verdict.ok, verdict.reason
