"""Record the dispatch keys a program meets, and rebuild inputs of those keys to tune them ahead.

``SWITCHYARD_RECORD=path`` makes the dispatcher append one JSON line per new dispatch key of the
process: the op, the key, and the inputs and attributes described (a tensor as its shape, stride,
dtype and device; a scalar as itself). ``python -m core.autotune --replay path`` reads the lines back,
builds fresh random inputs of each recorded description (then the spec's own ``synthesize`` for
data of the right kind), and tunes exactly those keys, so that a later run of the program finds
every decision in the tuning cache and tunes nothing on its hot path.
"""
from __future__ import annotations

import json
import os
import threading
from typing import Any, Iterator, Mapping

import torch

from core.errors import InvalidInput
from core.spec import OpSpec, Sample

ENV_RECORD = "SWITCHYARD_RECORD"
_lock = threading.Lock()


class _Unrecordable(Exception):
    pass


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": {"shape": list(value.shape), "stride": list(value.stride()),
                           "dtype": str(value.dtype).removeprefix("torch."), "device": value.device.type,
                           "requires_grad": bool(value.requires_grad)}}
    if isinstance(value, (list, tuple)):
        return {"list": [_describe(v) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _Unrecordable(type(value).__name__)


def record(path: str, spec: OpSpec, key: tuple[Any, ...], args: tuple[Any, ...], attrs: Mapping[str, Any]) -> bool:
    """Append one line for (op, key) to ``path``; False when an input cannot be written down (a process
    group, a generator: such keys are tuned when met)."""
    try:
        line = {"op": spec.name, "key": [k if isinstance(k, (str, int, float, bool, type(None))) else str(k) for k in key],
                "args": [_describe(a) for a in args], "attrs": {n: _describe(v) for n, v in attrs.items()}}
    except _Unrecordable:
        return False
    text = json.dumps(line, separators=(",", ":")) + "\n"
    with _lock, open(os.path.expanduser(path), "a", encoding="utf-8") as f:
        f.write(text)
    return True


def _dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInput(f"--replay: {where}: expected a torch dtype name, got {name!r}")
    return dtype


def _build(desc: Any, gen: torch.Generator, device: str | None, where: str) -> Any:
    if isinstance(desc, dict) and "tensor" in desc:
        t = desc["tensor"]
        dtype = _dtype(t["dtype"], where)
        shape, stride = [int(s) for s in t["shape"]], [int(s) for s in t["stride"]]
        size = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
        if dtype.is_floating_point:
            flat = torch.randn(size, generator=gen).to(dtype)
        elif dtype == torch.bool:
            flat = torch.rand(size, generator=gen) < 0.5
        else:
            flat = torch.zeros(size, dtype=dtype)  # indices: 0 is valid wherever an index is
        x = flat.as_strided(shape, stride)
        x = x.to(device or t.get("device", "cpu"))
        return x.requires_grad_(True) if t.get("requires_grad") and dtype.is_floating_point else x
    if isinstance(desc, dict) and "list" in desc:
        return [_build(d, gen, device, where) for d in desc["list"]]
    if isinstance(desc, dict) and "dtype" in desc:
        return _dtype(desc["dtype"], where)
    return desc


def lines(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The recorded lines, each (op, key) once, in the order first met."""
    seen: set[str] = set()
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError as e:
                raise InvalidInput(f"--replay: {path} line {n}: expected a JSON object, got {text[:60]!r} ({e})") from None
            if not isinstance(line, dict) or not {"op", "key", "args", "attrs"} <= set(line):
                raise InvalidInput(f"--replay: {path} line {n}: expected an object with op, key, args, attrs, got {text[:60]!r}")
            ident = json.dumps([line["op"], line["key"]])
            if ident not in seen:
                seen.add(ident)
                yield n, line


def inputs(spec: OpSpec, line: Mapping[str, Any], gen: torch.Generator,
           device: str | None = None) -> tuple[tuple[Any, ...], dict[str, Any], bool]:
    """Fresh inputs of a recorded line's description: (args, attrs, needs_grad), verified by the spec."""
    where = f"{spec.name} key {line['key']}"
    args = tuple(_build(a, gen, device, where) for a in line["args"])
    attrs = {n: _build(v, gen, device, where) for n, v in line["attrs"].items()}
    needs_grad = any(getattr(a, "requires_grad", False) for a in args)
    with torch.no_grad():
        sample = spec.synthesize(*spec.prepare(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                               attrs), gen)
    args, attrs = spec.prepare(sample.args, dict(sample.attrs))
    if needs_grad:
        args = tuple(a.detach().requires_grad_(True) if i in spec.grad_inputs else a for i, a in enumerate(args))
    return args, attrs, needs_grad


def sample_of(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> Sample:
    return Sample(args=tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), attrs=dict(attrs))
