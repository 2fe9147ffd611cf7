"""Fused precision_cast: a C++ kernel for the CPU (csrc/precision_cast.cpp) and a Triton kernel for CUDA
(triton/precision_cast.py), each reading the input once per phase."""
from __future__ import annotations

import torch

from core.ops.precision_cast import SOURCES, CastResult
from plugins.fused import _build
from registry import Kernel

OP = "precision_cast"


def _seed(seed: int | None) -> int:
    """The caller's seed, or one drawn from torch's default generator (so torch.manual_seed governs it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64)) if seed is None else seed


def _cpu_check(x: torch.Tensor, *, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool, margin: int,
               seed: int | None) -> list[str]:
    reason = _build.unavailable_reason(OP)
    return [f"the C++ kernel cannot be built: {reason}"] if reason else []


def precision_cast_cpu(x: torch.Tensor, *, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool, margin: int,
                       seed: int | None) -> CastResult:
    """One OpenMP pass: amax, non-finite count, round and store (two passes with scaling='amax')."""
    lib = _build.library(OP)
    stochastic = rounding == "stochastic"
    y, scale, amax, nonfinite = lib.precision_cast_cpu(x.detach().contiguous(), dtype, stochastic, scaling == "amax",
                                                       saturate, margin, _seed(seed) if stochastic else 0, None)
    return CastResult(y=y, scale=scale, amax=amax, nonfinite=nonfinite)


def _triton_check(x: torch.Tensor, *, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool, margin: int,
                  seed: int | None) -> list[str]:
    reason = _build.triton_reason()
    return [reason] if reason else []


def precision_cast_triton(x: torch.Tensor, *, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool,
                          margin: int, seed: int | None) -> CastResult:
    """The Triton launcher (imported lazily: this module must import where triton is absent)."""
    from plugins.fused.triton.precision_cast import precision_cast

    return precision_cast(x, dtype=dtype, rounding=rounding, scaling=scaling, saturate=saturate, margin=margin,
                          seed=_seed(seed) if rounding == "stochastic" else 0)


KERNELS = [
    Kernel(op=OP, backend="fused", fn=precision_cast_cpu, devices={"cpu"}, dtypes=set(SOURCES), priority=30,
           check=_cpu_check, description="C++/OpenMP, branch-free bit rounding the compiler vectorizes"),
    Kernel(op=OP, backend="fused-triton", fn=precision_cast_triton, devices={"cuda"}, dtypes=set(SOURCES), priority=30,
           check=_triton_check, description="Triton: stats with atomics, then the rounding kernel"),
]
