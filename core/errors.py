"""The exceptions Switchyard raises; each message names the op, the argument or backend, and what to do."""
from __future__ import annotations


class SwitchyardError(Exception):
    """Base class of every error Switchyard raises on purpose."""


class InvalidInput(SwitchyardError, ValueError):
    """The caller's inputs break the op's contract (shape, dtype, device, value range)."""


class Unsupported(SwitchyardError, RuntimeError):
    """No kernel can serve these inputs, or a forced backend cannot; the message lists every reason."""


class ValidationError(SwitchyardError, AssertionError):
    """A kernel's answer disagreed with the reference (shadow mode, or the conformance kit)."""


class PluginError(SwitchyardError, RuntimeError):
    """A plugin could not be loaded: its import, its hook or one of its kernel declarations failed."""


def invalid(op: str, arg: str, expected: str, got: object) -> InvalidInput:
    """Build the standard InvalidInput message: op, argument, what was expected, what was given."""
    return InvalidInput(f"{op}: argument {arg!r}: expected {expected}, got {got}")
