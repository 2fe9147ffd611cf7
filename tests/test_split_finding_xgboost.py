"""split_finding agrees with XGBoost: the root split of a depth-1 ``hist`` tree grown on the same
gradients and hessians has the same feature, cut, missing direction and gain.

On integer-valued data with fewer distinct values than ``max_bin``, XGBoost's cut points are the
distinct values themselves (src/common/quantile.cc, ``AddCutPoint``): bin ``v`` holds value ``v`` and a
split reported as ``f < c`` sends bins ``<= c - 1`` left, so our threshold ``t`` is XGBoost's ``c - 1``.
Its dump reports ``gain`` as ``loss_chg`` (src/tree/hist/evaluate_splits.h), and a missing value goes to
the child named by ``missing``.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from core import dispatcher
from core.ops.split_finding import MISSING

xgb = pytest.importorskip("xgboost", reason="xgboost is a test-only dependency (pip install xgboost-cpu)")

BACKENDS = ("reference", "torch", "fused")
PARAMS = [
    {"reg_lambda": 1.0, "reg_alpha": 0.0, "gamma": 0.0, "min_child_weight": 1.0},
    {"reg_lambda": 0.5, "reg_alpha": 0.3, "gamma": 0.0, "min_child_weight": 5.0},
    {"reg_lambda": 3.0, "reg_alpha": 0.0, "gamma": 0.5, "min_child_weight": 0.0},
]


def _data(rng: np.random.Generator, n: int, f: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer features in [0, k) with 10% missing; gradients that depend on one random feature's cut."""
    x = rng.integers(0, k, size=(n, f)).astype(np.float32)
    x[rng.random((n, f)) < 0.1] = np.nan
    j, cut = rng.integers(0, f), rng.integers(1, k)
    signal = np.where(np.nan_to_num(x[:, j], nan=rng.integers(0, k)) >= cut, 1.0, -1.0)
    grad = (0.3 * signal + rng.standard_normal(n)).astype(np.float32)
    hess = rng.uniform(0.05, 1.0, n).astype(np.float32)
    return x, grad, hess


def _xgboost_root(x: np.ndarray, grad: np.ndarray, hess: np.ndarray, params: dict) -> dict:
    dtrain = xgb.DMatrix(x, label=np.zeros(len(x)), missing=np.nan)
    booster = xgb.train({"tree_method": "hist", "max_depth": 1, "max_bin": 256, "eta": 1.0, "base_score": 0.0,
                         "nthread": 2, **params},
                        dtrain, num_boost_round=1, obj=lambda pred, d: (grad, hess))
    return json.loads(booster.get_dump(with_stats=True, dump_format="json")[0])


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"lambda{p['reg_lambda']}-alpha{p['reg_alpha']}-mcw{p['min_child_weight']}")
@pytest.mark.parametrize("seed", range(3))
def test_root_split_agrees_with_xgboost_hist(gen, params, seed):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)) + seed)
    n, f, k = 3000, 6, 9
    x, grad, hess = _data(rng, n, f, k)
    root = _xgboost_root(x, grad, hess, params)
    bins = torch.from_numpy(np.where(np.isnan(x), MISSING, x).astype(np.uint8))
    for backend in BACKENDS:
        with dispatcher.use_backend(backend):
            ours = dispatcher.split_finding(bins, torch.from_numpy(grad), torch.from_numpy(hess),
                                            torch.zeros(n, dtype=torch.int32), num_nodes=1, **params)
        _assert_same_root(ours, root, x)


def _assert_same_root(ours, root: dict, x: np.ndarray) -> None:
    if "split" not in root:  # XGBoost found no split worth making
        assert int(ours.feature[0]) == -1
        return
    feature = int(root["split"].removeprefix("f"))
    cond = float(root["split_condition"])
    distinct = np.unique(x[:, feature][~np.isnan(x[:, feature])])
    default_left = root["missing"] == root["yes"]
    if cond <= distinct.min():
        # XGBoost's "missing alone left, every value right" is our "every value left, missing right" mirrored.
        threshold, default_left = int(distinct.max()), False
    else:
        threshold = int(math.ceil(cond)) - 1  # f < cond  <=>  bin <= ceil(cond) - 1 for integer bins
        threshold = int(distinct[distinct <= threshold].max())  # XGBoost cuts only between values it saw
    assert int(ours.feature[0]) == feature
    assert int(ours.threshold[0]) == threshold
    assert bool(ours.default_left[0]) == default_left
    assert float(ours.gain[0]) == pytest.approx(float(root["gain"]), rel=2e-6, abs=1e-5)
