"""Train examples/gbdt.py and XGBoost ``hist`` side by side with the same parameters; print time per
tree and test AUC for both.

Data sets: (a) scikit-learn's bundled breast-cancer data (569 x 30), (b) a synthetic 1,000,000 x 28
binary task (plus 200,000 test rows) with nonlinear effects, interactions and 5% missing values in
four features. Both learners get the same quantile budget (255 bins), depth, learning rate,
regularization and starting margin; XGBoost uses every core (nthread = os.cpu_count()), as does the
fused kernel. Timed: the boosting rounds only, in wall seconds and in CPU seconds of the process (all
threads; the fairer figure when other work shares the cores). Quantization (our binner, XGBoost's
QuantileDMatrix) and our first-sight tuning (one untimed warm-up tree, which also builds the C++
kernel and, with an empty tuning cache, tunes every level's dispatch key) are reported apart.

    python scripts/bench_gbdt.py [--trees-small 100] [--trees-large 20] [--rows 1000000] [--skip-large]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import dispatcher  # noqa: E402
from examples.gbdt import GBDT  # noqa: E402


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """28 standard-normal features; the label's log-odds mix thresholds, products and smooth terms."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 28), dtype=np.float32)
    logit = (1.2 * X[:, 0] - 0.8 * X[:, 1] + np.where(X[:, 2] > 0.5, 1.0, -0.5) + 0.9 * X[:, 3] * X[:, 4]
             + np.sin(2 * X[:, 5]) + 0.5 * np.abs(X[:, 6]) - 0.4 * (X[:, 7] > X[:, 8]) + 0.3 * X[:, 9] ** 2
             - 0.6 * np.maximum(X[:, 10], 0) * np.sign(X[:, 11]) - 0.5)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    for f in (0, 3, 12, 20):
        X[rng.random(n) < 0.05, f] = np.nan
    return X, y


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


class _SplitTimer:
    """Wraps dispatcher.split_finding to add up the time spent in it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._inner = dispatcher.split_finding

    def __call__(self, *args, **kw):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = self._inner(*args, **kw)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def __enter__(self) -> _SplitTimer:
        dispatcher.split_finding = self
        return self

    def __exit__(self, *exc: object) -> None:
        dispatcher.split_finding = self._inner


def run(name: str, Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray, *, trees: int, depth: int,
        eta: float) -> list[list[object]]:
    import xgboost as xgb

    params = {"reg_lambda": 1.0, "reg_alpha": 0.0, "gamma": 0.0, "min_child_weight": 1.0}
    model = GBDT(n_trees=trees, max_depth=depth, learning_rate=eta, loss="logistic", max_bins=255, **params)
    t0 = time.perf_counter()
    bins = model.binner.fit(Xtr).transform(Xtr)
    bin_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    GBDT(n_trees=1, max_depth=depth, learning_rate=eta, **params).fit_binned(bins, ytr)  # first sight: tuning
    warm_s = time.perf_counter() - t0
    with _SplitTimer() as timer:
        t0, c0 = time.perf_counter(), time.process_time()
        model.fit_binned(bins, ytr)
        ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    ours_auc = _auc(yte, model.predict(Xte))

    base = float(np.clip(ytr.mean(), 1e-6, 1 - 1e-6))
    t0 = time.perf_counter()
    dtrain = xgb.QuantileDMatrix(Xtr, label=ytr, max_bin=255, missing=np.nan)
    xgb_bin_s = time.perf_counter() - t0
    xparams = {"tree_method": "hist", "objective": "binary:logistic", "max_depth": depth, "eta": eta, "max_bin": 255,
               "base_score": base, "nthread": os.cpu_count(), "lambda": params["reg_lambda"],
               "alpha": params["reg_alpha"], "gamma": params["gamma"], "min_child_weight": params["min_child_weight"]}
    t0, c0 = time.perf_counter(), time.process_time()
    booster = xgb.train(xparams, dtrain, num_boost_round=trees)
    xgb_s, xgb_cpu = time.perf_counter() - t0, time.process_time() - c0
    xgb_auc = _auc(yte, booster.predict(xgb.DMatrix(Xte, missing=np.nan)))
    per_tree, xgb_per_tree = ours_s / trees, xgb_s / trees
    return [[name, f"{len(Xtr):,} x {Xtr.shape[1]}", trees, depth, f"{per_tree:.4f}", f"{xgb_per_tree:.4f}",
             f"{per_tree / xgb_per_tree:.2f}x", f"{ours_cpu / trees:.4f} / {xgb_cpu / trees:.4f}",
             f"{timer.seconds / trees:.4f}", f"{ours_auc:.4f}", f"{xgb_auc:.4f}", f"{ours_auc - xgb_auc:+.4f}",
             f"{bin_s:.2f} / {xgb_bin_s:.2f}", f"{warm_s:.1f}"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees-small", type=int, default=100)
    p.add_argument("--trees-large", type=int, default=20)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--skip-large", action="store_true")
    a = p.parse_args()
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    rows = []
    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    rows += run("breast-cancer", Xtr, ytr, Xte, yte, trees=a.trees_small, depth=4, eta=0.1)
    if not a.skip_large:
        X, y = synthetic(a.rows + 200_000)
        rows += run("synthetic", X[:a.rows], y[:a.rows], X[a.rows:], y[a.rows:], trees=a.trees_large, depth=6, eta=0.3)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{load:.1f} at the end; logistic loss, lambda=1, min_child_weight=1, 255 bins")
    print(tabulate(rows, headers=["data", "train rows", "trees", "depth", "ours s/tree", "xgboost s/tree", "ratio",
                                  "CPU s/tree (ours/xgb)", "split_finding s/tree", "ours AUC", "xgboost AUC",
                                  "AUC diff", "binning s (ours/xgb)", "warm-up s"]))


if __name__ == "__main__":
    main()
