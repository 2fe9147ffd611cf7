"""Kernel: one implementation of one op, as data (what it is, where it runs, what it can serve)."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch


@dataclass(frozen=True, slots=True, kw_only=True)
class Kernel:
    """A kernel declaration: a function plus what it can serve.

    ``fn`` is called with the op's inputs positionally and every attribute as a keyword, defaults
    already filled in by the op's spec; a kernel with ``configs`` also gets one config's entries as
    keywords. ``check`` is called the same way and returns the reasons it cannot serve those inputs
    (empty when it can). ``backward`` is only for the reference backend: the gradient oracle, called as
    ``backward(args, attrs, grad_outputs)`` and returning one gradient per differentiable input.
    ``checks_data``: the kernel itself raises the ``InvalidInput`` of its op's ``verify_data`` (the rules
    that read the inputs' values) on every input it is given, so the dispatcher skips that separate pass
    when it serves this kernel.
    ``bind``: optional; called as ``bind(**attrs)`` (a config's entries included) on a warm call, it
    returns a function of the inputs alone that computes ``fn(*inputs, **attrs)`` for every input of
    that call's dispatch key, or ``None`` (then the dispatcher binds ``fn`` itself). The dispatcher keeps
    it in its memo of warm calls (``OpSpec.fast_key``), so a kernel can work out there, once, what
    depends on the attributes alone.
    """

    op: str
    backend: str
    fn: Callable[..., Any]
    devices: frozenset[str] = frozenset({"cpu"})
    dtypes: frozenset[torch.dtype] | None = None
    priority: int = 0
    check: Callable[..., Sequence[str]] | None = None
    differentiable: bool = False
    configs: tuple[Mapping[str, Any], ...] = ()
    backward: Callable[..., Sequence[Any]] | None = None
    checks_data: bool = False
    bind: Callable[..., Callable[..., Any] | None] | None = None
    description: str = ""
    plugin: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", frozenset(self.devices))
        if self.dtypes is not None:
            object.__setattr__(self, "dtypes", frozenset(self.dtypes))
        object.__setattr__(self, "configs", tuple(dict(c) for c in self.configs))

    def variants(self) -> list[Variant]:
        """One variant per tunable config (or the kernel itself when it has none)."""
        if not self.configs:
            return [Variant(name=self.backend, kernel=self, config={}, fn=self.fn)]
        return [
            Variant(name=variant_name(self.backend, c), kernel=self, config=dict(c), fn=functools.partial(self.fn, **c))
            for c in self.configs
        ]

    def not_supported_reasons(self, *args: Any, **attrs: Any) -> list[str]:
        """Why this kernel cannot serve a call made with these arguments; empty means supported."""
        from core.ops import get_spec

        spec = get_spec(self.op)
        bound_args, bound = spec.bind(tuple(args), attrs)
        return self.reasons_for(spec, bound_args, bound)

    def reasons_for(self, spec: Any, args: tuple[Any, ...], attrs: Mapping[str, Any]) -> list[str]:
        """``not_supported_reasons`` for inputs the spec has already bound."""
        reasons = []
        device = spec.device(args, attrs)
        if device not in self.devices:
            reasons.append(f"device {device!r} is not among its devices {sorted(self.devices)}")
        if self.dtypes is not None:
            bad = sorted({str(d).removeprefix("torch.") for d in spec.dtypes(args, attrs) if d not in self.dtypes})
            if bad:
                allowed = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
                reasons.append(f"dtype {', '.join(bad)} is not among its dtypes {allowed}")
        if self.check is not None and not reasons:
            try:
                reasons.extend(self.check(*args, **attrs))
            except Exception as e:  # a broken check must not take dispatch down
                reasons.append(f"its check raised {type(e).__name__}: {e}")
        return reasons


@dataclass(frozen=True, slots=True, kw_only=True)
class Variant:
    """A kernel with one of its configs bound: the unit the tuner validates, times and chooses."""

    name: str
    kernel: Kernel
    config: Mapping[str, Any] = field(default_factory=dict)
    fn: Callable[..., Any]

    def bound(self, attrs: Mapping[str, Any]) -> Callable[..., Any]:
        """A function of the inputs alone: ``fn(*inputs, **attrs)``, the kernel's own ``bind`` where it has one."""
        call = self.kernel.bind(**self.config, **attrs) if self.kernel.bind is not None else None
        return call if call is not None else functools.partial(self.fn, **attrs)


def variant_name(backend: str, config: Mapping[str, Any]) -> str:
    if not config:
        return backend
    return f"{backend}[{','.join(f'{k}={v}' for k, v in config.items())}]"


def signature_problem(kernel: Kernel, inputs: Sequence[str], attrs: Iterable[str]) -> str | None:
    """Why ``kernel.fn`` cannot be called as the op calls kernels, or None when it can."""
    try:
        sig = inspect.signature(kernel.fn)
    except (TypeError, ValueError):
        return None  # builtins without a signature: judged when called
    names = list(attrs)
    config_keys = {k for c in kernel.configs for k in c}
    try:
        sig.bind(*range(len(inputs)), **{n: None for n in [*names, *config_keys]})
    except TypeError as e:
        wanted = f"({', '.join(inputs)}, *, {', '.join(names)})"
        return f"kernel {kernel.backend!r} for op {kernel.op!r}: fn{sig} cannot be called as {wanted}: {e}"
    return None
