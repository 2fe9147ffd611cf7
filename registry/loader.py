"""Plugin discovery: built-ins from an explicit tuple, third parties from the ``switchyard`` entry points.

pluggy is used here and only here, once per load: the hook fills plain dicts that the dispatcher
reads. A plugin that fails (its import, its hook, a hook name pluggy does not know, a kernel for an
unknown op or with the wrong signature) is recorded as failed with its error, one warning is issued,
and every other plugin keeps working.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import threading
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import pluggy

from registry import hookspecs
from registry.kernel import Kernel, signature_problem

BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("reference", "plugins.reference"),
    ("torch", "plugins.torch_backend"),
    ("fused", "plugins.fused"),
)
ENTRY_POINT_GROUP = "switchyard"
ENV_DISABLE_AUTOLOAD = "SWITCHYARD_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "SWITCHYARD_BLOCK"


class PluginWarning(UserWarning):
    """A plugin failed to load; the others keep working."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginRecord:
    """What the loader knows of one plugin: where it came from and how loading went."""

    name: str
    source: str
    version: str
    status: str  # "loaded", "failed" or "blocked"
    error: str = ""
    kernels: tuple[Kernel, ...] = ()


@dataclass(slots=True, kw_only=True)
class Registry:
    """The loaded plugins and their kernels, grouped by op (highest priority first)."""

    plugins: tuple[PluginRecord, ...]
    kernels: dict[str, tuple[Kernel, ...]] = field(default_factory=dict)
    settings: tuple[Any, ...] = ()  # the environment's block list and autoload switch at load time

    def kernels_for(self, op: str) -> tuple[Kernel, ...]:
        return self.kernels.get(op, ())

    def reference(self, op: str) -> Kernel | None:
        for k in self.kernels_for(op):
            if k.backend == "reference":
                return k
        return None

    def versions(self) -> dict[str, str]:
        return {p.name: p.version for p in self.plugins if p.status == "loaded"}

    def failed(self) -> list[PluginRecord]:
        return [p for p in self.plugins if p.status == "failed"]


_lock = threading.RLock()
_registry: Registry | None = None
_extra: dict[str, Any] = {}
_listeners: list[Callable[[], None]] = []


def get_registry() -> Registry:
    """The registry, loaded on first use."""
    global _registry
    reg = _registry
    if reg is None:
        with _lock:
            if _registry is None:
                _registry = load()
            reg = _registry
    return reg


def reload() -> Registry:
    """Drop the loaded registry (and everything decided from it) and load again."""
    global _registry
    with _lock:
        _registry = load()
        for listener in list(_listeners):
            listener()
        return _registry


def on_reload(listener: Callable[[], None]) -> None:
    """Call ``listener`` whenever the registry is reloaded (the dispatcher forgets its choices)."""
    _listeners.append(listener)


def add_plugin(plugin: Any, name: str) -> Registry:
    """Register an in-process plugin object (a module or any object with the hook) and reload."""
    _extra[name] = plugin
    return reload()


def remove_plugin(name: str) -> Registry:
    _extra.pop(name, None)
    return reload()


def settings() -> tuple[Any, ...]:
    """What of the environment decides which plugins load (compare with ``Registry.settings``)."""
    return (tuple(sorted(_blocked())), _autoload(), tuple(_extra))


def _blocked() -> set[str]:
    return {n.strip() for n in os.environ.get(ENV_BLOCK, "").split(",") if n.strip()}


def _autoload() -> bool:
    return os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() not in {"1", "true", "yes", "on"}


def _own_version() -> str:
    try:
        return md.version("switchyard")
    except md.PackageNotFoundError:
        return "0+unknown"


def load() -> Registry:
    """Discover every plugin now; never raises for a plugin's fault."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = _blocked()
    records: list[PluginRecord] = []
    own = _own_version()

    sources: list[tuple[str, str, Callable[[], Any], str]] = []
    for name, module in BUILTIN_PLUGINS:
        sources.append((name, f"builtin {module}", lambda m=module: importlib.import_module(m), own))
    for name, plugin in _extra.items():
        sources.append((name, "registered in-process", lambda p=plugin: p, own))
    if _autoload():
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            version = ep.dist.version if ep.dist is not None else "unknown"
            dist = ep.dist.name if ep.dist is not None else "?"
            sources.append((ep.name, f"entry point {ep.value} ({dist})", ep.load, version))

    seen: set[str] = set()
    for name, source, get, version in sources:
        if name in seen:
            records.append(_failed(name, source, version, f"a plugin named {name!r} is already loaded"))
            continue
        seen.add(name)
        if name in blocked:
            records.append(PluginRecord(name=name, source=source, version=version, status="blocked",
                                        error=f"blocked by {ENV_BLOCK}"))
            continue
        records.append(_load_one(pm, name, source, get, version))

    by_op: dict[str, list[Kernel]] = {}
    for rec in records:
        for k in rec.kernels:
            by_op.setdefault(k.op, []).append(k)
    kernels = {op: tuple(sorted(ks, key=lambda k: -k.priority)) for op, ks in by_op.items()}
    return Registry(plugins=tuple(records), kernels=kernels, settings=settings())


def _failed(name: str, source: str, version: str, error: str) -> PluginRecord:
    warnings.warn(f"switchyard plugin {name!r} ({source}) failed to load: {error}", PluginWarning, stacklevel=3)
    return PluginRecord(name=name, source=source, version=version, status="failed", error=error)


def _load_one(pm: pluggy.PluginManager, name: str, source: str, get: Callable[[], Any], version: str) -> PluginRecord:
    try:
        plugin = get()
    except Exception as e:
        return _failed(name, source, version, f"import failed: {type(e).__name__}: {e}")
    if isinstance(plugin, ModuleType) and version == _own_version():
        version = getattr(plugin, "__version__", version)
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except Exception as e:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        return _failed(name, source, version, f"plugin {name!r} does not fit the hook spec: {type(e).__name__}: {e}")
    impls = [i for i in pm.hook.switchyard_kernels.get_hookimpls() if i.plugin is plugin]
    if not impls:
        pm.unregister(plugin)
        return _failed(name, source, version, f"plugin {name!r} implements no hook 'switchyard_kernels'")
    try:
        declared: list[Kernel] = []
        for impl in impls:
            declared.extend(impl.function() or ())
        kernels = tuple(_checked(name, k) for k in declared)
    except Exception as e:
        pm.unregister(plugin)
        return _failed(name, source, version, f"{type(e).__name__}: {e}")
    return PluginRecord(name=name, source=source, version=version, status="loaded", kernels=kernels)


def _checked(plugin: str, kernel: Any) -> Kernel:
    from core.ops import get_spec, op_names

    if not isinstance(kernel, Kernel):
        raise TypeError(f"plugin {plugin!r} returned {type(kernel).__name__}, expected registry.Kernel")
    if kernel.op not in op_names():
        raise ValueError(f"plugin {plugin!r} declares a kernel for unknown op {kernel.op!r}; known ops: {list(op_names())}")
    if not kernel.backend or not isinstance(kernel.backend, str):
        raise ValueError(f"plugin {plugin!r}: kernel for {kernel.op!r} has no backend name")
    if not callable(kernel.fn):
        raise TypeError(f"plugin {plugin!r}: kernel {kernel.backend!r} for {kernel.op!r}: fn is not callable")
    spec = get_spec(kernel.op)
    problem = signature_problem(kernel, spec.inputs, spec.attr_names)
    if problem:
        raise TypeError(f"plugin {plugin!r}: {problem}")
    return Kernel(**{f: getattr(kernel, f) for f in kernel.__dataclass_fields__ if f != "plugin"}, plugin=plugin)
