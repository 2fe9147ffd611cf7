"""The torch backend: idiomatic, vectorized torch on CPU and CUDA (backend name ``torch``).

The folder is not called ``torch`` so that it can never shadow the real package.
"""
from plugins._collect import collect
from registry import hookimpl


@hookimpl
def switchyard_kernels():  # type: ignore[no-untyped-def]
    return collect(__name__)
