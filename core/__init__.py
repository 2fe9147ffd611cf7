"""Switchyard's core: op specs, the dispatcher, the tuner and the tuning cache.

``from core import dispatcher`` is the entry point: ``dispatcher.attention(q, k, v, causal=True)``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["dispatcher"]


def __getattr__(name: str) -> Any:
    if name == "dispatcher":
        import core.dispatcher as dispatcher

        return dispatcher
    raise AttributeError(f"module 'core' has no attribute {name!r}")
