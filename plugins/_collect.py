"""How a built-in backend gathers its kernels: each ``<backend>/<op>.py`` ends with a ``KERNELS`` list."""
from __future__ import annotations

import importlib
import importlib.util

from core.ops import OP_NAMES
from registry.kernel import Kernel


def collect(package: str) -> list[Kernel]:
    """The KERNELS of every op module the backend package has, in the order of ``OP_NAMES``."""
    kernels: list[Kernel] = []
    for op in OP_NAMES:
        name = f"{package}.{op}"
        if importlib.util.find_spec(name) is None:
            continue
        kernels.extend(importlib.import_module(name).KERNELS)
    return kernels
