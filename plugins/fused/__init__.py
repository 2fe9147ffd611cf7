"""The fused backend: hand-written kernels, C++ for the CPU (compiled at first use) and Triton for CUDA."""
from plugins._collect import collect
from plugins.fused._build import plugin_version
from registry import hookimpl

__version__ = plugin_version()  # level and sources: see plugin_version


@hookimpl
def switchyard_kernels():  # type: ignore[no-untyped-def]
    return collect(__name__)
