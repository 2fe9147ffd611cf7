"""Fused precision_cast: a C++ kernel for the CPU (csrc/precision_cast.cpp) and a Triton kernel for CUDA
(triton/precision_cast.py), each reading the input once per phase."""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from core.ops.precision_cast import SOURCES, CastResult
from plugins.fused import _build
from registry import Kernel

OP = "precision_cast"
POOL_ENV = "SWITCHYARD_POOL_MB"
POOL_DEFAULT_MB = 1024


def _seed(seed: int | None) -> int:
    """The caller's seed, or one drawn from torch's default generator (so torch.manual_seed governs it)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64)) if seed is None else seed


def _cpu_check(x: torch.Tensor, *, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool, margin: int,
               seed: int | None) -> list[str]:
    reason = _build.unavailable_reason(OP)
    return [f"the C++ kernel cannot be built: {reason}"] if reason else []


def pool_limit_from_env() -> int:
    """The output pool's cap on idle bytes from ``SWITCHYARD_POOL_MB`` (default 1024 MiB; 0 turns it off)."""
    raw = os.environ.get(POOL_ENV, "").strip()
    if not raw:
        return POOL_DEFAULT_MB << 20
    if not raw.isdigit():
        warnings.warn(f"{POOL_ENV}={raw!r} is not a whole number of MiB >= 0; the fused precision_cast output "
                      f"pool keeps its default cap of {POOL_DEFAULT_MB} MiB", RuntimeWarning, stacklevel=3)
        return POOL_DEFAULT_MB << 20
    return int(raw) << 20


def _library():
    """The C++ library of the level in force, with its output pool's cap set from the environment on
    first use (each instruction-set level's build has its own pool)."""
    lib = _build.library(OP)
    if _build.default_isa() not in _cast_ops:
        _configure()
    return lib


def _configure():
    """Load the level in force, set its pool's cap once, and remember its cast call (the pybind11 one)."""
    isa = _build.default_isa()
    lib = _build.library(OP)
    lib.precision_cast_pool_limit(pool_limit_from_env())
    op = _cast_ops[isa] = _build.module(OP).precision_cast_cpu  # the same level as lib
    return op


# a level ("avx512", "avx2", "scalar") -> its cast call, once its pool cap is set. The kernel looks its
# call up by the level in force straight from _build's two globals (``default_isa`` spelled out): a
# small cast costs a few microseconds, and each function call on its way costs a tenth of one.
_cast_ops: dict = {}


# The C++ kernel's options in one int (see cast_into in csrc/precision_cast.cpp): a small cast costs a
# few microseconds, and each argument converted on the way into a torch op costs a fraction of one.
_TARGET_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}
_OPTION_BITS = {("nearest", "none"): 0, ("nearest", "amax"): 8, ("stochastic", "none"): 4, ("stochastic", "amax"): 12}


_FLAGS = {(d, r, s, sat): code | bits | (16 if sat else 0) for d, code in _TARGET_CODES.items()
          for (r, s), bits in _OPTION_BITS.items() for sat in (False, True)}  # one lookup a call


def cpu_flags(dtype: torch.dtype, rounding: str, scaling: str, saturate: bool, margin: int) -> int:
    """The flags argument of the C++ ops for these attributes."""
    return _FLAGS[dtype, rounding, scaling, saturate] | (margin << 8)


def precision_cast_cpu(x: torch.Tensor, *, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool, margin: int,
                       seed: int | None) -> CastResult:
    """One OpenMP pass: amax, non-finite count, round and store (two passes with scaling='amax')."""
    op = _cast_ops.get(_build._forced or _build._from_env)
    if op is None:  # first call at this level (or SWITCHYARD_CPU_ISA not read yet)
        op = _configure()
    flags = _FLAGS[dtype, rounding, scaling, saturate] | (margin << 8)
    if x.requires_grad or not x.is_contiguous():
        x = x.detach()  # a cast has no gradient
        if flags & 4:  # stochastic: draws by the logical index (the C++ call casts a transpose as it lies)
            x = x.contiguous()
    return _new(CastResult, op(x, flags, _seed(seed) if flags & 4 else 0))


_new = tuple.__new__  # CastResult._make without its length check: the C++ call returns four tensors


def bind_cpu(*, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool, margin: int,
             seed: int | None) -> Any:
    """``precision_cast_cpu`` with these attributes worked out once (the dispatcher's warm calls): a
    function of ``x`` alone; None for stochastic rounding, whose seed is drawn per call."""
    flags = _FLAGS[dtype, rounding, scaling, saturate] | (margin << 8)
    if flags & 4:
        return None

    def cast(x: torch.Tensor) -> CastResult:
        op = _cast_ops.get(_build._forced or _build._from_env) or _configure()  # the level in force
        if x.requires_grad:
            x = x.detach()
        return _new(CastResult, op(x, flags, 0))

    return cast


def output_pool_stats() -> dict[str, int]:
    """The CPU kernel's output pool (see csrc/precision_cast.cpp): idle bytes and blocks it holds for
    reuse, allocations it served from them (hits) or from the OS (misses), and its cap on idle bytes."""
    keys = ("idle_bytes", "idle_blocks", "hits", "misses", "limit_bytes")
    return dict(zip(keys, _library().precision_cast_pool_stats()))


def empty_output_pool() -> int:
    """Give every idle block of the output pool back to the OS (like ``torch.cuda.empty_cache``);
    returns the bytes freed. Outputs still alive are untouched."""
    return int(_library().precision_cast_pool_clear())


def set_output_pool_limit(limit_bytes: int) -> int:
    """Cap the bytes the output pool keeps idle (0 turns it off), freeing idle blocks over it; returns
    the previous cap. The cap starts at ``SWITCHYARD_POOL_MB`` MiB (default 1024)."""
    return int(_library().precision_cast_pool_limit(int(limit_bytes)))


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
           check=_cpu_check, bind=bind_cpu, description="C++/OpenMP, branch-free bit rounding the compiler vectorizes"),
    Kernel(op=OP, backend="fused-triton", fn=precision_cast_triton, devices={"cuda"}, dtypes=set(SOURCES), priority=30,
           check=_triton_check, description="Triton: stats with atomics, then the rounding kernel"),
]
