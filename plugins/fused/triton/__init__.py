"""Triton kernels of the fused backend, one module per op (imported only where triton is installed)."""
from __future__ import annotations

from typing import Any, Callable


def cuda_ms(call: Callable[[], Any], reps: int = 10) -> float:
    """Mean milliseconds of ``call()`` over ``reps`` back-to-back runs, timed with CUDA events.

    For the ops' ``gpu_check`` functions; the caller has run ``call`` once already (compile, warm-up)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
