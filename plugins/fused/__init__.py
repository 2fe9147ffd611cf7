"""The fused backend: hand-written kernels, C++ for the CPU (compiled at first use) and Triton for CUDA."""
from plugins._collect import collect
from registry import hookimpl


@hookimpl
def switchyard_kernels():  # type: ignore[no-untyped-def]
    return collect(__name__)
