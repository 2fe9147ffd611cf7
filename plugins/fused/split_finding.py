"""Fused split finding: C++ with OpenMP for CPU tensors, Triton for CUDA tensors.

Both build the (grad, hess) histograms in one pass without contended atomics (per-thread private
histograms merged at the end on the CPU; private copies per group of programs on the GPU), then scan
every (node, feature) for XGBoost's best split (Chen and Guestrin, "XGBoost", KDD 2016, Algorithm 3).
The C++ kernel is ``csrc/split_finding.cpp``, the Triton kernels ``triton/split_finding.py``.
"""
from __future__ import annotations

from typing import Any

import torch

from core.ops.split_finding import SplitResult
from plugins.fused import _build
from registry import Kernel

OP = "split_finding"
SLOTS = 256
MAX_HIST_BYTES = 2 << 30
GPU_COPIES = 16  # private histogram copies of the Triton kernel: fewer programs contend for one slot


def _hist_bytes(num_nodes: int, f: int) -> int:
    return num_nodes * f * SLOTS * 2 * 8


def _check(bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor, node_ids: torch.Tensor, *, num_nodes: int,
           num_bins: int, **attrs: Any) -> list[str]:
    reasons = []
    copies = 1 if bins.device.type == "cpu" else GPU_COPIES
    reason = _build.unavailable_reason(OP) if bins.device.type == "cpu" else _build.triton_reason()
    if reason is not None:
        reasons.append(reason)
    need = _hist_bytes(num_nodes, bins.shape[1]) * copies
    if need > MAX_HIST_BYTES:
        reasons.append(f"its histogram{'s' if copies > 1 else ''} of {copies} x num_nodes x F x 256 slots would need "
                       f"{need / 2**30:.1f} GiB, over its limit of {MAX_HIST_BYTES / 2**30:.0f} GiB")
    return reasons


def split_finding(bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor, node_ids: torch.Tensor, *,
                  num_nodes: int, num_bins: int, reg_lambda: float, reg_alpha: float, gamma: float,
                  min_child_weight: float) -> SplitResult:
    """CPU: one pass over row blocks into per-thread private histograms (OpenMP), merged, then one scan
    per (node, feature). CUDA: the Triton histogram and scan kernels."""
    if bins.device.type == "cuda":
        from plugins.fused.triton.split_finding import split_finding as launch

        return launch(bins, grad, hess, node_ids, num_nodes=num_nodes, num_bins=num_bins, reg_lambda=reg_lambda,
                      reg_alpha=reg_alpha, gamma=gamma, min_child_weight=min_child_weight, copies=GPU_COPIES)
    lib = _build.library(OP)
    out = lib.split_finding_cpu(bins, grad, hess, node_ids, num_nodes, num_bins, reg_lambda, reg_alpha, gamma,
                                min_child_weight, 0)
    return SplitResult(*out)


KERNELS = [
    Kernel(op=OP, backend="fused", fn=split_finding, devices={"cpu", "cuda"}, dtypes={torch.float32, torch.float64},
           priority=30, check=_check,
           description="private histograms without contended atomics, then a scan per node and feature: "
                       "C++ (OpenMP, per-thread copies) on the CPU, Triton (per-program-group copies) on CUDA"),
]
