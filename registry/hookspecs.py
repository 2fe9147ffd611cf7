"""The one hook a Switchyard plugin implements."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import pluggy

if TYPE_CHECKING:
    from registry.kernel import Kernel

PROJECT = "switchyard"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def switchyard_kernels() -> Iterable[Kernel]:  # type: ignore[empty-body]
    """Return the kernels this plugin provides. Called once when the registry loads, never per op call."""
