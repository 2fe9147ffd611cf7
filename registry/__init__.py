"""Switchyard's plugin registry: the hook, the Kernel declaration, discovery and the conformance kit."""
from registry.hookspecs import hookimpl, hookspec
from registry.kernel import Kernel, Variant

__all__ = ["Kernel", "Variant", "hookimpl", "hookspec"]
