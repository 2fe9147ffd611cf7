"""split_finding kernels side by side, with XGBoost as the peer: one ``hist`` round of a depth-1 tree is
XGBoost's root split search (histogram build plus scan, with its per-round overhead), so it stands
beside our one-node calls; deeper levels have no separate XGBoost entry point and show ours only.

    python scripts/bench_split_finding.py [--rows 1000000] [--features 28] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.ops.split_finding import SPEC, make_inputs  # noqa: E402
from plugins.fused.split_finding import split_finding as fused  # noqa: E402
from plugins.torch_backend.split_finding import split_finding as torch_kernel  # noqa: E402


def _median_ms(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _xgboost_root_ms(bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor, reps: int) -> float:
    import xgboost as xgb

    x = bins.numpy().astype(np.float32)
    x[x == 255] = np.nan
    dtrain = xgb.QuantileDMatrix(x, label=np.zeros(len(x), dtype=np.float32), max_bin=256, missing=np.nan)
    g, h = grad.numpy(), hess.numpy()
    params = {"tree_method": "hist", "max_depth": 1, "eta": 1.0, "base_score": 0.0, "max_bin": 256}

    def once() -> None:
        xgb.train(params, dtrain, num_boost_round=1, obj=lambda pred, d: (g, h))

    return _median_ms(once, reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=28)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for nodes in (1, 4, 16, 32):
        args = make_inputs(gen, "cpu", n=a.rows, f=a.features, num_nodes=nodes, inactive=0.0)
        attrs = {"num_nodes": nodes, "num_bins": 255, "reg_lambda": 1.0, "reg_alpha": 0.0, "gamma": 0.0,
                 "min_child_weight": 1.0}
        SPEC.verify(args, attrs)
        t_fused = _median_ms(lambda: fused(*args, **attrs), a.reps)
        t_torch = _median_ms(lambda: torch_kernel(*args, **attrs), max(1, a.reps // 2))
        t_xgb = _xgboost_root_ms(args[0], args[1], args[2], a.reps) if nodes == 1 else None
        rows.append([f"{a.rows:,} x {a.features}", nodes, f"{t_fused:.1f}", f"{t_torch:.1f}", f"{t_torch / t_fused:.1f}x",
                     "" if t_xgb is None else f"{t_xgb:.1f}", "" if t_xgb is None else f"{t_xgb / t_fused:.2f}x"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {a.reps} runs; float32 grad/hess")
    print(tabulate(rows, headers=["rows x features", "nodes", "fused ms", "torch ms", "torch / fused",
                                  "xgboost depth-1 round ms", "xgboost / fused"]))


if __name__ == "__main__":
    main()
