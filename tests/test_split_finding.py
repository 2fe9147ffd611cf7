"""split_finding: the contract against a row-by-row brute force, the tie rule, the compare rule, bad
input, the dispatcher, and every built-in kernel through the conformance kit."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from core import dispatcher
from core.errors import InvalidInput
from core.ops.split_finding import MISSING, SPEC, SplitResult, make_inputs
from core.spec import Sample
from core.tuning import judge
from plugins.fused.split_finding import split_finding as fused_kernel
from plugins.reference.split_finding import split_finding as reference
from plugins.torch_backend.split_finding import split_finding as torch_kernel
from registry.conformance import check_case, conformance_cases

DEFAULTS = {"num_bins": 255, "reg_lambda": 1.0, "reg_alpha": 0.0, "gamma": 0.0, "min_child_weight": 1.0}
KERNELS = {"reference": reference, "torch": torch_kernel, "fused": fused_kernel}


def _attrs(**kw):
    attrs = {**DEFAULTS, **kw}
    return attrs


def brute_force(bins, grad, hess, node_ids, *, num_nodes, num_bins, reg_lambda, reg_alpha, gamma, min_child_weight):
    """Every candidate by masking rows directly (no histogram), in the tie order, float64 Python sums."""
    X = bins.numpy().astype(np.int64)
    g, h, ids = grad.double().numpy(), hess.double().numpy(), node_ids.numpy()

    def score(G, H):
        t = np.sign(G) * max(abs(G) - reg_alpha, 0.0)
        return t * t / (H + reg_lambda) if H + reg_lambda > 0 else 0.0

    rows = []
    for m in range(num_nodes):
        inside = ids == m
        G, H = g[inside].sum(), h[inside].sum()
        best = None
        for f, t, d in itertools.product(range(X.shape[1]), range(num_bins - 1), (False, True)):
            missing = X[:, f] == MISSING
            left = inside & ((~missing & (X[:, f] <= t)) | (missing & d))
            GL, HL = g[left].sum(), h[left].sum()
            GR, HR = G - GL, H - HL
            gain = score(GL, HL) + score(GR, HR) - score(G, H)
            if HL >= min_child_weight and HR >= min_child_weight and gain > gamma and (best is None or gain > best[0]):
                best = (gain, f, t, d, GL, HL, GR, HR)
        rows.append(best)
    return rows


def _assert_same_as_brute_force(out, brute):
    for m, best in enumerate(brute):
        if best is None:
            assert (int(out.feature[m]), int(out.threshold[m]), bool(out.default_left[m])) == (-1, -1, False)
            assert float(out.gain[m]) == 0 and float(out.left_hess[m]) == 0 and float(out.right_grad[m]) == 0
            continue
        gain, f, t, d, *sums = best
        assert (int(out.feature[m]), int(out.threshold[m]), bool(out.default_left[m])) == (f, t, d), f"node {m}"
        got = [float(out.gain[m]), float(out.left_grad[m]), float(out.left_hess[m]), float(out.right_grad[m]),
               float(out.right_hess[m])]
        np.testing.assert_allclose(got, [gain, *sums], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("params", [
    {},
    {"reg_alpha": 0.4, "reg_lambda": 2.0, "min_child_weight": 3.0},
    {"gamma": 0.5, "reg_lambda": 0.0, "min_child_weight": 0.0},
])
def test_matches_brute_force(gen, kernel, params):
    bins, grad, hess, node_ids = make_inputs(gen, "cpu", n=90, f=3, num_nodes=3, num_bins=6, missing=0.15,
                                             inactive=0.1, dtype=torch.float64)
    attrs = _attrs(num_nodes=3, num_bins=6, **params)
    out = KERNELS[kernel](bins, grad, hess, node_ids, **attrs)
    _assert_same_as_brute_force(out, brute_force(bins, grad, hess, node_ids, **attrs))


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_ties_go_to_lower_feature_then_threshold_then_missing_right(gen, kernel):
    n = 40
    # Feature 1 is a copy of feature 0, so every candidate of feature 1 ties with feature 0's.
    x = torch.randint(0, 4, (n,), generator=gen)
    bins = torch.stack([x, x, torch.randint(0, 4, (n,), generator=gen)], dim=1).to(torch.uint8)
    grad = torch.where(x >= 2, 1.0, -1.0).double()  # best split: x <= 1 | x >= 2
    hess = torch.ones(n, dtype=torch.float64)
    ids = torch.zeros(n, dtype=torch.int64)
    out = KERNELS[kernel](bins, grad, hess, ids, **_attrs(num_nodes=1, num_bins=6))
    # feature 1 ties with feature 0, and without missing rows d=True ties with d=False
    assert (int(out.feature[0]), int(out.threshold[0]), bool(out.default_left[0])) == (0, 1, False)
    # Thresholds tie: empty bins 2 and 3 make t=1, 2, 3 identical when x only takes 0, 1, 4, 5.
    x2 = torch.tensor([0, 1, 4, 5] * 10)
    bins2 = x2[:, None].to(torch.uint8)
    grad2 = torch.where(x2 >= 4, 1.0, -1.0).double()
    out2 = KERNELS[kernel](bins2, grad2, torch.ones(40, dtype=torch.float64), torch.zeros(40, dtype=torch.int32),
                           **_attrs(num_nodes=1, num_bins=6))
    assert (int(out2.feature[0]), int(out2.threshold[0])) == (0, 1)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_missing_rows_follow_default_left(kernel):
    # Missing rows carry the negative gradients: the best split sends them left with the low bins.
    x = torch.tensor([0, 1, 2, 3, MISSING] * 8, dtype=torch.uint8)[:, None]
    grad = torch.tensor([-1.0, -1.0, 1.0, 1.0, -2.0] * 8, dtype=torch.float64)
    out = KERNELS[kernel](x, grad, torch.ones(40, dtype=torch.float64), torch.zeros(40, dtype=torch.int64),
                          **_attrs(num_nodes=1, num_bins=4))
    assert (int(out.feature[0]), int(out.threshold[0]), bool(out.default_left[0])) == (0, 1, True)
    assert float(out.left_grad[0]) == -32.0 and float(out.left_hess[0]) == 24.0
    assert float(out.right_grad[0]) == 16.0 and float(out.right_hess[0]) == 16.0


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_no_valid_split_gives_the_empty_answer(gen, kernel):
    bins, grad, hess, ids = make_inputs(gen, "cpu", n=200, f=3, num_nodes=3, num_bins=8)
    ids = torch.where(ids == 1, -1, ids)  # node 1 has no rows
    bins[ids == 2] = 5  # node 2: every feature constant
    out = KERNELS[kernel](bins, grad, hess, ids, **_attrs(num_nodes=3, num_bins=8))
    for m in (1, 2):
        assert (int(out.feature[m]), int(out.threshold[m]), bool(out.default_left[m])) == (-1, -1, False)
        assert all(float(t[m]) == 0 for t in out[3:])
    assert int(out.feature[0]) >= 0
    high = KERNELS[kernel](bins, grad, hess, ids, **_attrs(num_nodes=3, num_bins=8, gamma=float(out.gain[0]) * 1.01))
    assert int(high.feature[0]) == -1  # gain must be strictly above gamma


# -- the compare rule --------------------------------------------------------------------------------

def _sample(gen, **kw):  # about 700 rows per node
    args = make_inputs(gen, "cpu", n=3000, f=5, num_nodes=4, num_bins=32, **kw)
    attrs = _attrs(num_nodes=4, num_bins=32)
    SPEC.verify(args, attrs)
    return Sample(args=args, attrs=attrs)


@pytest.mark.parametrize("dtype, off", [(torch.float32, 1e-2), (torch.float64, 1e-9)])
def test_compare_accepts_the_reference_and_rejects_wrong_answers(gen, dtype, off):
    """``off``: a relative error well above the dtype's tolerance (float32 sums of ~700 rows: ~1e-5)."""
    sample = _sample(gen, dtype=dtype)
    ref = reference(*sample.args, **sample.attrs)
    assert judge(SPEC, ref, ref, sample).ok
    assert (ref.feature >= 0).all()
    for field, node in (("left_grad", 1), ("right_hess", 0), ("gain", 2)):
        fields = [t.clone() for t in ref]
        i = SplitResult._fields.index(field)
        fields[i][node] += off * float(ref.left_hess[node] + ref.right_hess[node])
        verdict = judge(SPEC, SplitResult(*fields), ref, sample)
        assert not verdict.ok and field.replace("gain", "reported gain") in verdict.reason
    # A worse split, reported honestly (its own sums and gain): rejected for its gain.
    verdict = judge(SPEC, _worse_split(sample, ref, node=0), ref, sample)
    assert not verdict.ok and "below the gain" in verdict.reason
    fields = [t.clone() for t in ref]
    fields[0][3], fields[1][3] = -1, -1
    for t in fields[2:]:
        t[3] = 0
    verdict = judge(SPEC, SplitResult(*fields), ref, sample)
    assert not verdict.ok and "a valid split of gain" in verdict.reason
    flipped = [t.clone() for t in ref]
    flipped[2][1] = ~flipped[2][1]  # default_left flipped, sums and gain left as they were
    assert not judge(SPEC, SplitResult(*flipped), ref, sample).ok


def _worse_split(sample, ref, node):
    """The reference's answer with node's split replaced by the best split of the weakest feature,
    reported honestly (its own sums and gain)."""
    bins, grad, hess, ids = sample.args
    per_feature = [reference(bins[:, f:f + 1], grad, hess, ids, **sample.attrs) for f in range(bins.shape[1])]
    f = min(range(bins.shape[1]), key=lambda f: float(per_feature[f].gain[node]))
    one = per_feature[f]
    assert 0 < float(one.gain[node]) < float(ref.gain[node]) - 1e-3
    fields = [t.clone() for t in ref]
    for i, t in enumerate(one):
        fields[i][node] = t[node]
    fields[0][node] = f
    return SplitResult(*fields)


def test_compare_tolerates_float32_rounding(gen):
    """An answer computed from gradients off by a few float32 ulps passes, though it may pick a near-tie."""
    sample = _sample(gen)
    ref = reference(*sample.args, **sample.attrs)
    bins, grad, hess, ids = sample.args
    nudged = grad.double() * (1 + 1e-6 * torch.randn(grad.shape, generator=gen, dtype=torch.float64))
    assert judge(SPEC, reference(bins, nudged, hess, ids, **sample.attrs), ref, sample).ok


# -- bad input -----------------------------------------------------------------------------------------

def _good():
    bins = torch.randint(0, 10, (20, 3), dtype=torch.uint8)
    return bins, torch.randn(20), torch.rand(20), torch.zeros(20, dtype=torch.int32)


BAD = [
    (lambda b, g, h, i: ((b.int(), g, h, i), {"num_nodes": 1}), "argument 'bins': expected dtype torch.uint8"),
    (lambda b, g, h, i: ((b[:, 0], g, h, i), {"num_nodes": 1}), "argument 'bins': expected a 2-D tensor"),
    (lambda b, g, h, i: ((b, g, h, i), {"num_nodes": 1, "num_bins": 256}), "argument 'num_bins': expected an int in [1, 255], got 256"),
    (lambda b, g, h, i: ((b, g, h, i), {"num_nodes": 1, "num_bins": 8}), "argument 'bins': expected values in [0, 8)"),
    (lambda b, g, h, i: ((b, g, -h, i), {"num_nodes": 1}), "argument 'hess': expected finite values >= 0"),
    (lambda b, g, h, i: ((b, g[:19], h, i), {"num_nodes": 1}), "argument 'grad': expected a 1-D tensor of N=20 rows"),
    (lambda b, g, h, i: ((b, g, h.double(), i), {"num_nodes": 1}), "argument 'hess': expected dtype torch.float32"),
    (lambda b, g, h, i: ((b, g.half(), h.half(), i), {"num_nodes": 1}), "argument 'grad': expected dtype one of"),
    (lambda b, g, h, i: ((b, g, h, i + 1), {"num_nodes": 1}), "argument 'node_ids': expected values in [-1, 1)"),
    (lambda b, g, h, i: ((b, g, h, i - 2), {"num_nodes": 1}), "got values in [-2, -2]"),
    (lambda b, g, h, i: ((b, g, h, i.float()), {"num_nodes": 1}), "argument 'node_ids': expected dtype int32 or int64"),
    (lambda b, g, h, i: ((b, g, h, i), {}), "argument 'num_nodes': expected a value (it is required)"),
    (lambda b, g, h, i: ((b, g, h, i), {"num_nodes": 0}), "argument 'num_nodes': expected an int >= 1, got 0"),
    (lambda b, g, h, i: ((b, g, h, i), {"num_nodes": 1, "reg_lambda": -1.0}), "argument 'reg_lambda': expected a finite float >= 0, got -1.0"),
    (lambda b, g, h, i: ((b, g, h, i), {"num_nodes": 1, "gamma": -0.1}), "argument 'gamma': expected a finite float >= 0"),
    (lambda b, g, h, i: ((b, g, h, i), {"num_nodes": 1, "min_child_weight": -1}), "argument 'min_child_weight': expected"),
    (lambda b, g, h, i: ((b, g, h, i), {"num_nodes": 1, "reg_alpha": float("nan")}), "argument 'reg_alpha': expected"),
    (lambda b, g, h, i: ((b, g * float("nan"), h, i), {"num_nodes": 1}), "argument 'grad': expected finite values"),
    (lambda b, g, h, i: ((b, g, h, [0] * 20), {"num_nodes": 1}), "argument 'node_ids': expected a torch.Tensor, got list"),
]


@pytest.mark.parametrize("make, message", BAD)
def test_bad_input_names_op_argument_and_values(make, message):
    args, attrs = make(*_good())
    with pytest.raises(InvalidInput) as info:
        dispatcher.split_finding(*args, **attrs)
    assert message in str(info.value) and str(info.value).startswith("split_finding: ")


def test_missing_value_255_is_allowed_with_fewer_bins():
    bins, grad, hess, ids = _good()
    bins[:, 1] = MISSING
    out = dispatcher.split_finding(bins, grad, hess, ids, num_nodes=1, num_bins=10)
    assert int(out.feature[0]) != 1


def test_key_buckets_rows_and_nodes():
    b, g, h, i = _good()
    a = SPEC.key((b, g, h, i), _attrs(num_nodes=5))
    assert a == SPEC.key((b[:17], g[:17], h[:17], i[:17]), _attrs(num_nodes=7))
    assert a != SPEC.key((b, g.double(), h.double(), i), _attrs(num_nodes=5))
    assert a != SPEC.key((b, g, h, i), _attrs(num_nodes=9))


# -- the dispatcher and the conformance kit ------------------------------------------------------------

def test_dispatcher_end_to_end(gen):
    bins, grad, hess, ids = make_inputs(gen, "cpu", n=5000, f=6, num_nodes=4, num_bins=40)
    out = dispatcher.split_finding(bins, grad, hess, ids, num_nodes=4, num_bins=40)
    assert isinstance(out, SplitResult)
    attrs = _attrs(num_nodes=4, num_bins=40)
    ref = reference(bins, grad, hess, ids, **attrs)
    verdict = judge(SPEC, out, ref, Sample(args=(bins, grad, hess, ids), attrs=attrs))
    assert verdict.ok, verdict.reason
    text = str(dispatcher.explain("split_finding", bins, grad, hess, ids, num_nodes=4, num_bins=40))
    assert "reference" in text and "torch" in text and "fused" in text and "chosen:" in text


BUILTIN = [c for backend in ("reference", "torch", "fused") for c in conformance_cases(backend, ops=["split_finding"])]


@pytest.mark.parametrize("case", BUILTIN, ids=str)
def test_builtin_kernels_conform(case):
    check_case(case)


@pytest.mark.parametrize("bad", [17, 100, 254])
def test_a_bin_at_or_above_num_bins_is_rejected_beside_missing_values(bad):
    """verify's one-max range check (bins + 1 wraps 255 to 0): 255 passes anywhere, any value in
    [num_bins, 255) is named."""
    bins = torch.full((50, 3), 255, dtype=torch.uint8)
    bins[::2, 1] = 16
    args = (bins, torch.randn(50), torch.rand(50), torch.zeros(50, dtype=torch.int32))
    dispatcher.split_finding(*args, num_nodes=1, num_bins=17)  # 16 and 255 are fine
    bins[7, 2] = bad
    with pytest.raises(InvalidInput, match=rf"argument 'bins'.*num_bins=17.*got {bad}"):
        dispatcher.split_finding(*args, num_nodes=1, num_bins=17)
