"""examples/gbdt.py: trees equal to XGBoost's on integer-valued data, AUC close to XGBoost's on the
breast-cancer data, predictions on new data consistent with training, and the squared-error loss."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
xgb = pytest.importorskip("xgboost", reason="xgboost is a test-only dependency (pip install xgboost-cpu)")


def _load_example():
    spec = importlib.util.spec_from_file_location("switchyard_example_gbdt", ROOT / "examples" / "gbdt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gbdt = _load_example()


@pytest.fixture(autouse=True)
def _no_timing(monkeypatch):
    """The learner's correctness does not depend on which validated kernel wins: skip the timing."""
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "off")


def _integer_data(rng: np.random.Generator, n: int, f: int = 5) -> tuple[np.ndarray, np.ndarray]:
    x = rng.integers(0, 12, size=(n, f)).astype(np.float32)
    y = (np.sin(x[:, 0]) + 0.3 * x[:, 1] * (x[:, 2] > 5) + 0.5 * rng.standard_normal(n)).astype(np.float32)
    x[rng.random((n, f)) < 0.08] = np.nan
    return x, y


def _xgboost(x, y, loss, trees, depth, eta, base_score):
    objective = {"squared_error": "reg:squarederror", "logistic": "binary:logistic"}[loss]
    params = {"tree_method": "hist", "objective": objective, "max_depth": depth, "eta": eta, "max_bin": 256,
              "base_score": base_score, "lambda": 1.0, "min_child_weight": 1.0, "nthread": 2}
    return xgb.train(params, xgb.DMatrix(x, label=y, missing=np.nan), num_boost_round=trees)


@pytest.mark.parametrize("loss", ["squared_error", "logistic"])
def test_trees_equal_xgboost_on_integer_data(gen, loss):
    """With one bin per distinct value both learners see the same candidates, so every split and leaf
    weight agrees and so do the predictions, on the training rows and on new rows with missing values."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    x, y = _integer_data(rng, 3000)
    x_new, _ = _integer_data(rng, 1000)
    if loss == "logistic":
        y = (y > np.median(y)).astype(np.float32)
    model = gbdt.GBDT(n_trees=3, max_depth=3, learning_rate=0.5, loss=loss).fit(x, y)
    base = float(y.mean())
    booster = _xgboost(x, y, loss, trees=3, depth=3, eta=0.5, base_score=base)
    for data in (x, x_new):
        theirs = booster.predict(xgb.DMatrix(data, missing=np.nan), output_margin=True)
        np.testing.assert_allclose(model.decision_function(data), theirs, rtol=1e-4, atol=1e-4)


def test_breast_cancer_auc_close_to_xgboost():
    from sklearn.datasets import load_breast_cancer
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    ours = roc_auc_score(yte, gbdt.GBDT(n_trees=30, max_depth=3, learning_rate=0.3).fit(Xtr, ytr).predict(Xte))
    booster = _xgboost(Xtr, ytr, "logistic", trees=30, depth=3, eta=0.3, base_score=float(ytr.mean()))
    theirs = roc_auc_score(yte, booster.predict(xgb.DMatrix(Xte)))
    assert ours > 0.97 and abs(ours - theirs) < 0.01, (ours, theirs)


def test_prediction_on_training_rows_equals_the_training_margin(gen):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    X = rng.standard_normal((2000, 6))
    X[rng.random(X.shape) < 0.1] = np.nan
    y = (np.nan_to_num(X[:, 0]) + np.nan_to_num(X[:, 1]) ** 2 > 0.8).astype(np.float64)
    model = gbdt.GBDT(n_trees=5, max_depth=4, learning_rate=0.3)
    bins = model.binner.fit(X).transform(X)
    model.fit_binned(bins, y)
    assert len(model.trees) == 5
    margin = np.full(len(y), model.base_margin)
    for tree in model.trees:
        margin += tree.apply(bins)
    np.testing.assert_allclose(model.decision_function(X), margin, rtol=0, atol=1e-12)
    # the margin the learner kept while growing (leaf values collected by its routing of training rows)
    np.testing.assert_allclose(model.train_margin, margin, rtol=0, atol=1e-12)


def test_squared_error_training_loss_never_increases(gen):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    X = rng.uniform(-2, 2, (3000, 4))
    y = np.sin(2 * X[:, 0]) + X[:, 1] ** 2 + 0.1 * rng.standard_normal(3000)
    model = gbdt.GBDT(n_trees=20, max_depth=3, learning_rate=0.3, loss="squared_error")
    bins = model.binner.fit(X).transform(X)
    losses = []
    model.fit_binned(bins, y, on_tree=lambda i: losses.append(float(((model.train_margin - y) ** 2).mean())))
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.1 * float(y.var())


def test_binner_one_bin_per_distinct_value_and_missing_is_255():
    X = np.array([[0.5, np.nan], [2.0, 1.0], [0.5, 3.0], [7.0, 1.0]])
    binner = gbdt.QuantileBinner().fit(X)
    assert binner.transform(X).tolist() == [[0, 255], [1, 0], [0, 1], [2, 0]]
    many = np.random.default_rng(0).standard_normal((5000, 1))
    bins = gbdt.QuantileBinner(max_bins=255).fit(many).transform(many)
    counts = np.bincount(bins[:, 0].numpy(), minlength=255)
    assert int(bins.max()) == 254 and counts.min() >= 5000 // 255 - 3  # quantile bins: about equally full


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="loss must be one of"):
        gbdt.GBDT(loss="hinge")
    with pytest.raises(ValueError, match="max_depth >= 1"):
        gbdt.GBDT(max_depth=0)
