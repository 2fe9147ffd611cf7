"""Reference split finding: float64 numpy, one (node, feature) histogram at a time, written to be obviously right."""
from __future__ import annotations

import numpy as np
import torch

from core.ops.split_finding import MISSING, SplitResult
from registry import Kernel


def _score(g: np.ndarray, h: np.ndarray, reg_lambda: float, reg_alpha: float) -> np.ndarray:
    """T(G)^2 / (H + lambda) with T the L1 soft threshold; 0 for a side without hessian (XGBoost's CalcGain)."""
    t = np.sign(g) * np.maximum(np.abs(g) - reg_alpha, 0.0)
    den = h + reg_lambda
    return np.where(den > 0, t * t / np.where(den > 0, den, 1.0), 0.0)


def split_finding(bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor, node_ids: torch.Tensor, *,
                  num_nodes: int, num_bins: int, reg_lambda: float, reg_alpha: float, gamma: float,
                  min_child_weight: float) -> SplitResult:
    """Per node and feature: a histogram of (grad, hess) over the bins plus the missing slot, prefix sums
    for every threshold with missing sent right and left, then the largest valid gain in the tie order
    (feature, threshold, missing-right before missing-left)."""
    X = bins.cpu().numpy()
    g = grad.cpu().numpy().astype(np.float64)
    h = hess.cpu().numpy().astype(np.float64)
    ids = node_ids.cpu().numpy()
    B = num_bins
    feature = np.full(num_nodes, -1, dtype=np.int64)
    threshold = np.full(num_nodes, -1, dtype=np.int64)
    default_left = np.zeros(num_nodes, dtype=bool)
    sums = np.zeros((5, num_nodes))  # gain, left_grad, left_hess, right_grad, right_hess
    for m in range(num_nodes):
        rows = ids == m
        G, H = g[rows].sum(), h[rows].sum()
        parent = _score(np.array(G), np.array(H), reg_lambda, reg_alpha)
        best = -np.inf
        for f in range(X.shape[1]):
            slot = np.where(X[rows, f] == MISSING, B, X[rows, f]).astype(np.int64)
            hg = np.bincount(slot, weights=g[rows], minlength=B + 1)
            hh = np.bincount(slot, weights=h[rows], minlength=B + 1)
            # [threshold, d]: the sums of the left side, missing sent right (d=0) or left (d=1)
            GL = np.cumsum(hg[:B - 1])[:, None] + np.array([0.0, hg[B]])
            HL = np.cumsum(hh[:B - 1])[:, None] + np.array([0.0, hh[B]])
            GR, HR = G - GL, H - HL
            gain = _score(GL, HL, reg_lambda, reg_alpha) + _score(GR, HR, reg_lambda, reg_alpha) - parent
            valid = (HL >= min_child_weight) & (HR >= min_child_weight) & (gain > gamma)
            if not valid.any():
                continue
            # argmax takes the first of equal maxima: the lower threshold, then missing-right
            t, d = np.unravel_index(np.argmax(np.where(valid, gain, -np.inf)), gain.shape)
            if gain[t, d] > best:  # strictly: an equal gain of a later feature loses
                best = gain[t, d]
                feature[m], threshold[m], default_left[m] = f, t, bool(d)
                sums[:, m] = gain[t, d], GL[t, d], HL[t, d], GR[t, d], HR[t, d]
    device = bins.device
    return SplitResult(torch.from_numpy(feature).to(device), torch.from_numpy(threshold).to(device),
                       torch.from_numpy(default_left).to(device),
                       *(torch.from_numpy(s.copy()).to(device) for s in sums))


KERNELS = [
    Kernel(op="split_finding", backend="reference", fn=split_finding, devices={"cpu", "cuda"}, priority=-100,
           description="float64 numpy, one node and feature at a time: the executable definition"),
]
