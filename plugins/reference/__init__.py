"""The reference backend: plain numpy, the executable definition of every op and the oracle."""
from plugins._collect import collect
from registry import hookimpl


@hookimpl
def switchyard_kernels():  # type: ignore[no-untyped-def]
    return collect(__name__)
