"""The op specs: one module per op, each defining ``SPEC``."""
from __future__ import annotations

import importlib
from functools import lru_cache

from core.errors import InvalidInput
from core.spec import OpSpec

OP_NAMES: tuple[str, ...] = (
    "attention",
    "precision_cast",
    "split_finding",
    "nearest_neighbor",
    "decode_step",
    "all_reduce",
)


@lru_cache(maxsize=None)
def _specs() -> dict[str, OpSpec]:
    specs = {}
    for name in OP_NAMES:
        try:
            module = importlib.import_module(f"core.ops.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"core.ops.{name}":
                raise
            continue
        specs[name] = module.SPEC
    return specs


def op_names() -> tuple[str, ...]:
    """The ops this installation defines, in the order the CLI tunes them."""
    return tuple(_specs())


def all_specs() -> dict[str, OpSpec]:
    return dict(_specs())


def get_spec(name: str) -> OpSpec:
    try:
        return _specs()[name]
    except KeyError:
        raise InvalidInput(f"unknown op {name!r}: expected one of {list(_specs())}") from None
