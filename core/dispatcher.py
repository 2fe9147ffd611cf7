"""The per-call path: bind -> verify -> dispatch key -> cached choice -> kernel.

``dispatcher.<op>(...)`` (one function per op, generated from the specs) and ``dispatcher.call(op,
...)`` are the same path. On a warm key the work is the spec's cheap verify, the key, one dict lookup and,
unless the chosen kernel checks the data in its own pass (``Kernel.checks_data``), the spec's
``verify_data``; everything else (loading plugins, validating, timing, the cache file) happens on the miss
path in ``core.tuning``, once per dispatch key and process.

Resolution order: a backend forced by ``use_backend`` or ``SWITCHYARD_BACKEND``; else this process's
choice for the key; else the tuning cache's winner; else tune now (``SWITCHYARD_AUTOTUNE=lazy``, the
default) or take the highest-priority candidate that passes validation (``SWITCHYARD_AUTOTUNE=off``).
"""
from __future__ import annotations

import contextlib
import contextvars
import keyword
import os
import sys
import threading
import warnings
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping

import torch

from core import hotpath as _hotpath, record, tuning
from core.errors import InvalidInput, Unsupported, ValidationError
from core.ops import all_specs, get_spec
from core.spec import REQUIRED, OpSpec, Sample, describe_call
from registry import loader
from registry.kernel import Variant

ENV_BACKEND = "SWITCHYARD_BACKEND"
ENV_AUTOTUNE = "SWITCHYARD_AUTOTUNE"
ENV_VALIDATE = "SWITCHYARD_VALIDATE"
ENV_BUDGET = "SWITCHYARD_TUNE_BUDGET"
ENV_RECORD = record.ENV_RECORD

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("switchyard_backend", default=None)

# os.environ.get costs microseconds on the hot path; its backing dict costs nanoseconds and is kept
# in step by os.environ's own setters (monkeypatch.setenv included).
_ENV_DATA: Any = getattr(os.environ, "_data", None)
_ENCODE: Any = getattr(os.environ, "encodekey", None)
if _ENV_DATA is not None and _ENCODE is not None:
    _K_BACKEND, _K_VALIDATE = _ENCODE(ENV_BACKEND), _ENCODE(ENV_VALIDATE)

    def _slow_env() -> bool:
        return _K_BACKEND in _ENV_DATA or _K_VALIDATE in _ENV_DATA
else:  # pragma: no cover - non-CPython
    def _slow_env() -> bool:
        return ENV_BACKEND in os.environ or ENV_VALIDATE in os.environ


class DispatchWarning(UserWarning):
    """A chosen kernel raised on a caller's data; it was quarantined and the call fell back."""


@dataclass(frozen=True, slots=True)
class _Choice:
    fn: Any
    name: str
    check: Any = None  # the spec's verify_data, unless the kernel checks the data itself
    bound: Any = None  # attrs -> a function of the inputs alone (Variant.bound)


def _choice(spec: OpSpec, variant: Variant) -> _Choice:
    return _Choice(variant.fn, variant.name, None if variant.kernel.checks_data else spec.verify_data, variant.bound)


class _State:
    """Everything the dispatcher remembers; replaced whole by ``reset``."""

    def __init__(self) -> None:
        self.choices: dict[tuple[str, tuple[Any, ...]], _Choice] = {}
        self.quarantined: dict[tuple[str, tuple[Any, ...], str], str] = {}
        # op -> its warm calls: fast key -> (dispatch key, choice, the choice's kernel bound to the call's
        # attributes, those attributes as verify left them); emptied for an op whenever one of its
        # choices is quarantined
        self.warm: dict[str, dict[Any, tuple[tuple[Any, ...], _Choice, Any, dict[str, Any]]]] = {}
        self.lock = threading.RLock()
        self._tuner: tuning.Tuner | None = None

    @property
    def tuner(self) -> tuning.Tuner:
        if self._tuner is None:
            with self.lock:
                if self._tuner is None:
                    use_cache = os.environ.get("SWITCHYARD_NO_CACHE", "") not in ("1", "true")
                    self._tuner = tuning.new_tuner(use_cache=use_cache)
        return self._tuner


_state = _State()
_SPECS: dict[str, OpSpec] = all_specs()


def reset() -> None:
    """Forget every choice, verdict and quarantine of this process (the cache file stays)."""
    global _state
    _state = _State()


loader.on_reload(reset)


def tuner() -> tuning.Tuner:
    """The tuner behind this process's dispatcher (the CLI and ``explain`` read it)."""
    return _state.tuner


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (or a variant such as ``fused[bucket_mb=4]``) for calls in this context."""
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


_grad_enabled = torch.is_grad_enabled


def _needs_grad(spec: OpSpec, args: tuple[Any, ...]) -> bool:
    if not _grad_enabled():
        return False
    for i in spec.grad_inputs:
        if getattr(args[i], "requires_grad", False):
            return True
    return False


def _key(spec: OpSpec, args: tuple[Any, ...], attrs: Mapping[str, Any], key: tuple[Any, ...] | None = None) -> tuple[Any, ...]:
    """The spec's dispatch key (``key`` when the caller has it already, as verify may hand it back),
    marked when gradients will flow (only differentiable kernels serve it)."""
    if key is None:
        key = spec.key(args, attrs)
    if spec.grad_inputs and _needs_grad(spec, args):
        key = (*key, "grad")
    return key


def _dispatch(spec: OpSpec, args: tuple[Any, ...], attrs: dict[str, Any]) -> Any:
    args, attrs = spec.bind(args, attrs)
    return _bound(spec, args, attrs)


WARM_CALLS = 1024  # fast keys remembered per op; past that the op's memo starts over


def _python_memo_key(spec: OpSpec) -> Any:
    """The memo key from the spec's Python ``fast_key``, with the grad mark of a differentiable op."""
    fast_key = spec.fast_key
    if fast_key is None or not spec.grad_inputs:
        return fast_key

    def memo_key(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> Any:
        fast = fast_key(args, attrs)
        return None if fast is None else (fast, _needs_grad(spec, args))  # the grad mark reads the grad mode

    return memo_key


# op -> (args, attrs) -> its memo key, or None where the call has none: the C++ keys of core.hotpath
# where that module is built (the same distinctions, read from the tensors' TensorImpl), else the spec's
# Python fast_key. A process that finds the module missing builds it at its first miss.
_memo_key: dict[str, Any] = {}
_hot_built = False


def _use_memo_keys(build: bool = False) -> None:
    global _hot_built
    _hot_built = _hot_built or build
    native = _hotpath.keys(build)
    for name, spec in _SPECS.items():
        _memo_key[name] = native.get(name) if spec.fast_key is not None and name in native else _python_memo_key(spec)


def _bound(spec: OpSpec, args: tuple[Any, ...], attrs: dict[str, Any]) -> Any:
    """The call of bound inputs (``spec.inputs`` in order) and attributes (every one, defaults filled).

    A spec with a ``fast_key`` lets a repeated call skip verify, the key and the kernel's own argument
    handling: its memo key (the fast key and grad mark; equal only for calls that pass verify alike, to
    one dispatch key) finds the choice it was served last time, with the kernel already bound to those
    attributes."""
    state = _state
    if _slow_env() or _forced.get() is not None:
        return _call_special(spec, _key(spec, args, attrs, spec.verify(args, attrs)), args, attrs)
    memo_key = _memo_key[spec.name]
    fast = memo_key(args, attrs) if memo_key is not None else None
    if fast is not None:
        try:
            hit = state.warm[spec.name][fast]
        except KeyError:
            pass
        except TypeError:  # an unhashable attribute: verify names it
            fast = None
        else:
            key, choice, call, canonical = hit
            if choice.check is not None:
                choice.check(args, canonical)
            try:  # _run, inlined
                return call(*args)
            except InvalidInput:
                raise
            except Exception as e:
                return _failed(state, spec, key, args, canonical, choice, e)
    key = _key(spec, args, attrs, spec.verify(args, attrs))  # a verify may return the key it computed
    choice = state.choices.get((spec.name, key))  # _checked_choice, inlined
    if choice is None:
        if spec.verify_data is not None:
            spec.verify_data(args, attrs)
        choice = _resolve(state, spec, key, args, attrs)
        if not _hot_built:  # the first miss of the process: the miss path's time, once
            _use_memo_keys(build=True)
    elif choice.check is not None:
        choice.check(args, attrs)
    call = None
    if fast is not None and choice.bound is not None:
        try:
            call = choice.bound(attrs)
        except Exception as e:  # a kernel's bind is the kernel's own code
            return _failed(state, spec, key, args, attrs, choice, e)
        warm = state.warm.setdefault(spec.name, {})
        if len(warm) >= WARM_CALLS:
            warm.clear()
        warm[fast] = (key, choice, call, dict(attrs))
    return _run(state, spec, key, args, attrs, choice, call)


def _run(state: _State, spec: OpSpec, key: tuple[Any, ...], args: tuple[Any, ...], attrs: dict[str, Any],
         choice: _Choice, call: Any) -> Any:
    """The chosen kernel on the call (``call``, when bound already); a kernel that raises on it is
    quarantined for the key and the next validated one serves."""
    try:
        return call(*args) if call is not None else choice.fn(*args, **attrs)
    except InvalidInput:
        raise
    except Exception as e:
        return _failed(state, spec, key, args, attrs, choice, e)


def _failed(state: _State, spec: OpSpec, key: tuple[Any, ...], args: tuple[Any, ...], attrs: dict[str, Any],
            choice: _Choice, error: Exception) -> Any:
    if spec.collective and tuning.lockstep_for(spec, args, attrs) is not None:
        raise error  # one rank switching kernels alone would desynchronize the group
    return _fall_back(state, spec, key, args, attrs, choice, error)


# While Dynamo traces a call it takes the custom op instead (core.library): one graph node whose real
# implementation is _dispatch at run time. Eager calls keep the direct path: is_dynamo_compiling costs
# about 25 ns (torch.compiler.is_compiling about 170 ns, the custom-op boundary about 10 us);
# _is_compiling_flag covers the other tracers (non-strict export).
_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler


def call(op: str, /, *args: Any, **attrs: Any) -> Any:
    """Run ``op`` on these inputs with the kernel chosen for their dispatch key."""
    entry = _ENTRIES.get(op)
    if entry is not None:
        return entry(*args, **attrs)
    # an op this module has no entry for, or InvalidInput naming the unknown op
    return _call_unbound(get_spec(op), args, attrs)


def _call_unbound(spec: OpSpec, args: tuple[Any, ...], attrs: dict[str, Any]) -> Any:
    """A call as the caller wrote it: the custom op while tracing, else spec.bind and the dispatch."""
    if _dynamo_compiling() or _compiler._is_compiling_flag:
        return _library.compiled_call(spec.name, args, attrs)
    return _dispatch(spec, args, attrs)


def _compiled_call(name: str, args: tuple[Any, ...], attrs: dict[str, Any]) -> Any:
    return _library.compiled_call(name, args, attrs)  # core.library imports this module: bound late


def _generic_entry(spec: OpSpec) -> Any:
    def entry(*args: Any, **attrs: Any) -> Any:
        return _call_unbound(spec, args, attrs)

    return entry


# The generated entry of an op: its attributes are the function's own keyword parameters with their
# defaults, so Python binds a well-formed call itself (spec.bind merged the defaults into the caller's
# dict on every call: a third of a microsecond, more once a large kernel has left the caches cold).
# Anything else (inputs given by keyword, an unknown keyword, a required attribute left out, a wrong
# count of inputs) goes the generic way, through spec.bind and its InvalidInput errors.
_ENTRY_TEMPLATE = """
def {name}(*args, {params}**extra):
    if extra or len(args) != {n_inputs}{required}:
        return _sy_slow(args, {{{given}}}, extra)
    attrs = {{{given}}}
    if _sy_compiling() or _sy_compiler._is_compiling_flag:
        return _sy_compiled_call({name!r}, args, attrs)
    return _sy_bound(_sy_spec, args, attrs)
"""


def _make_entry(spec: OpSpec) -> Any:
    names = [a.name for a in spec.attrs]
    if not all(n.isidentifier() and not keyword.iskeyword(n) and not n.startswith("_sy_") for n in names) or \
            {"args", "extra", "attrs"} & set(names) or not spec.name.isidentifier():
        entry = _generic_entry(spec)
    else:
        def slow(args: tuple[Any, ...], given: dict[str, Any], extra: dict[str, Any]) -> Any:
            attrs = {k: v for k, v in given.items() if v is not REQUIRED}
            attrs.update(extra)
            return _call_unbound(spec, args, attrs)

        namespace: dict[str, Any] = {
            "_sy_slow": slow, "_sy_spec": spec, "_sy_bound": _bound, "_sy_compiling": _dynamo_compiling,
            "_sy_compiler": _compiler, "_sy_compiled_call": _compiled_call, "_sy_required": REQUIRED,
            **{f"_sy_default_{a.name}": a.default for a in spec.attrs}}
        source = _ENTRY_TEMPLATE.format(
            name=spec.name, n_inputs=len(spec.inputs),
            params="".join(f"{n}=_sy_default_{n}, " for n in names),
            required="".join(f" or {a.name} is _sy_required" for a in spec.attrs if a.default is REQUIRED),
            given=", ".join(f"{n!r}: {n}" for n in names))
        exec(compile(source, f"<switchyard entry {spec.name}>", "exec"), namespace)  # noqa: S102
        entry = namespace[spec.name]
    entry.__name__ = entry.__qualname__ = spec.name
    entry.__doc__ = f"{spec.summary}.\n\nInputs: {', '.join(spec.inputs)}; attributes: " + ", ".join(
        f"{a.name}={a.default!r}" for a in spec.attrs)
    return entry


_use_memo_keys()
_ENTRIES: dict[str, Any] = {}  # op -> dispatcher.<op>, which call() goes through
for _name, _spec in _SPECS.items():
    globals()[_name] = _ENTRIES[_name] = _make_entry(_spec)

from core import library as _library  # noqa: E402  (registers torch.ops.switchyard.*; it reads this module)


# -- the miss path ---------------------------------------------------------------------------------

def _mode() -> str:
    mode = os.environ.get(ENV_AUTOTUNE, "lazy").strip().lower() or "lazy"
    if mode not in ("lazy", "off", "predict"):
        raise InvalidInput(f"{ENV_AUTOTUNE}: expected 'lazy', 'predict' or 'off', got {mode!r}")
    return mode


def _budget() -> float:
    try:
        return float(os.environ.get(ENV_BUDGET, tuning.DEFAULT_LAZY_BUDGET))
    except ValueError:
        raise InvalidInput(f"{ENV_BUDGET}: expected seconds as a number, got {os.environ[ENV_BUDGET]!r}") from None


def _decision(state: _State, spec: OpSpec, key: tuple[Any, ...], args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuning.Decision:
    tuner = state.tuner
    decision = tuner.decisions.get((spec.name, key))
    if decision is None:
        if _stream_capturing(spec, args, attrs):
            return _decided_for_capture(tuner, spec, key, args, attrs)
        path = os.environ.get(ENV_RECORD)
        if path:  # before tuning: a key whose tuning raises is still worth tuning ahead
            record.record(path, spec, key, args, attrs)
        decision = tuner.decide(spec, key, args, attrs, needs_grad=key[-1:] == ("grad",), mode=_mode(), budget=_budget())
    return decision


def _stream_capturing(spec: OpSpec, args: tuple[Any, ...], attrs: Mapping[str, Any]) -> bool:
    """Whether this call is being captured into a CUDA graph (a CUDA call while its stream captures).
    Asked on the miss path only: a warm key's call needs no answer."""
    return spec.device(args, attrs) == "cuda" and torch.cuda.is_current_stream_capturing()


def _decided_for_capture(tuner: tuning.Tuner, spec: OpSpec, key: tuple[Any, ...], args: tuple[Any, ...],
                         attrs: Mapping[str, Any]) -> tuning.Decision:
    """A miss during CUDA graph capture: only a decision already made (the tuning cache's) may serve it,
    since tuning launches, times and synchronizes, all of which capture forbids."""
    cached = None
    if tuner.cache is not None:
        cached = tuner._from_cache(spec, key, tuning.lockstep_for(spec, args, attrs) if spec.collective else None)
    if cached is not None and cached.winner:
        tuner.decisions[(spec.name, key)] = cached
        return cached
    raise Unsupported(
        f"{spec.name}: no kernel is decided for dispatch key {key}, and this call is being captured into a CUDA "
        f"graph, where tuning cannot run (validation, timing and their synchronizations break a capture); tune "
        f"the key before capturing: make one warm-up call with the same shapes and attributes outside the "
        f"capture, or run `python -m core.autotune --ops {spec.name}` on cases of this key")


def _checked_choice(state: _State, spec: OpSpec, key: tuple[Any, ...], args: tuple[Any, ...],
                    attrs: Mapping[str, Any]) -> _Choice:
    """The key's choice, with the call's data checked by the spec's verify_data unless the chosen kernel
    checks it itself; always before tuning a new key (its samples follow the call's data, such as the
    database's location)."""
    choice = state.choices.get((spec.name, key))
    if choice is None:
        if spec.verify_data is not None:
            spec.verify_data(args, attrs)
        return _resolve(state, spec, key, args, attrs)
    if choice.check is not None:
        choice.check(args, attrs)
    return choice


def _resolve(state: _State, spec: OpSpec, key: tuple[Any, ...], args: tuple[Any, ...], attrs: Mapping[str, Any]) -> _Choice:
    with state.lock:
        choice = state.choices.get((spec.name, key))
        if choice is not None:
            return choice
        decision = _decision(state, spec, key, args, attrs)
        for name in decision.fallbacks():
            if (spec.name, key, name) in state.quarantined:
                continue
            variant = state.tuner.variant(spec.name, name)
            if variant is not None:
                choice = _choice(spec, variant)
                state.choices[(spec.name, key)] = choice
                return choice
        raise _no_kernel(state, spec, key, args, attrs, decision)


def _no_kernel(state: _State, spec: OpSpec, key: tuple[Any, ...], args: tuple[Any, ...], attrs: Mapping[str, Any],
               decision: tuning.Decision) -> Unsupported:
    lines = [f"No kernel can serve {describe_call(spec, args, attrs)}:"]
    for row in decision.rows:
        why = row.reason or row.status
        if (spec.name, key, row.backend) in state.quarantined:
            why = f"quarantined after raising on a call: {state.quarantined[(spec.name, key, row.backend)]}"
        lines.append(f"  `{row.backend}` is not usable because: {why}")
    if not decision.rows:
        lines.append("  no backend declares a kernel for this op")
    for rec in loader.get_registry().failed():
        lines.append(f"  (plugin {rec.name!r} failed to load: {rec.error})")
    return Unsupported("\n".join(lines))


def _callers_level() -> int:
    """``warnings.warn``'s stacklevel, called here, for the first frame outside the dispatcher (its
    module and the generated entries): the caller's own line, however deep the path that warns."""
    frame, level = sys._getframe(2), 2
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith("<switchyard entry")):
        frame, level = frame.f_back, level + 1
    return level


def _fall_back(state: _State, spec: OpSpec, key: tuple[Any, ...], args: tuple[Any, ...], attrs: Mapping[str, Any],
               failed: _Choice, error: Exception) -> Any:
    """A chosen kernel raised on the caller's data: quarantine it for this key and try the next."""
    with state.lock:
        marker = (spec.name, key, failed.name)
        if marker not in state.quarantined:
            state.quarantined[marker] = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"switchyard: kernel {failed.name!r} for {spec.name} raised {type(error).__name__}: {error}; "
                f"quarantined for dispatch key {key} and falling back to the next validated kernel",
                DispatchWarning, stacklevel=_callers_level())
        if state.choices.get((spec.name, key)) is failed:
            del state.choices[(spec.name, key)]
        state.warm.pop(spec.name, None)  # its warm calls may hold the failed kernel
        try:
            choice = _resolve(state, spec, key, args, attrs)
        except Unsupported:
            raise error
    if choice.check is not None and failed.check is None:
        choice.check(args, attrs)  # the failed kernel was trusted to check the data
    try:
        return choice.fn(*args, **attrs)
    except InvalidInput:
        raise
    except Exception as e:
        return _fall_back(state, spec, key, args, attrs, choice, e)


# -- forced backends and shadow validation ----------------------------------------------------------

def _forced_variant(spec: OpSpec, key: tuple[Any, ...], args: tuple[Any, ...], attrs: Mapping[str, Any], name: str) -> Variant:
    tuner = _state.tuner
    matches = [v for v in tuner.variants(spec.name) if v.name == name]
    if not matches:
        matches = [v for v in tuner.variants(spec.name) if v.kernel.backend == name]
        decided = tuner.decisions.get((spec.name, key))
        if decided is not None and len(matches) > 1:
            best = [v for v in matches if v.name in decided.fallbacks()]
            matches = sorted(best, key=lambda v: decided.fallbacks().index(v.name)) or matches
    if not matches:
        known = sorted({v.kernel.backend for v in tuner.variants(spec.name)})
        raise Unsupported(f"{spec.name}: forced backend {name!r} has no kernel for this op; backends with one: {known}")
    variant = matches[0]
    reasons = tuner.reasons(spec, variant.kernel, args, attrs, key[-1:] == ("grad",))
    if reasons:
        raise Unsupported(f"{spec.name}: forced backend {name!r} cannot serve {describe_call(spec, args, attrs)}: "
                          + "; ".join(reasons))
    return variant


def _call_special(spec: OpSpec, key: tuple[Any, ...], args: tuple[Any, ...], attrs: dict[str, Any]) -> Any:
    forced = _forced.get() or os.environ.get(ENV_BACKEND) or None
    if forced:
        choice = _choice(spec, _forced_variant(spec, key, args, attrs, forced))
        if choice.check is not None:
            choice.check(args, attrs)
    else:
        choice = _checked_choice(_state, spec, key, args, attrs)
    fn, name = choice.fn, forced or choice.name
    out = fn(*args, **attrs)
    mode = os.environ.get(ENV_VALIDATE, "").strip().lower()
    if mode == "always" and not _stream_capturing(spec, args, attrs):  # a shadow check syncs
        _shadow_check(spec, args, attrs, out, name)
    elif mode not in ("", "never", "off"):
        raise InvalidInput(f"{ENV_VALIDATE}: expected 'always' or 'never', got {mode!r}")
    return out


def _shadow_check(spec: OpSpec, args: tuple[Any, ...], attrs: Mapping[str, Any], out: Any, name: str) -> None:
    reference = loader.get_registry().reference(spec.name)
    if reference is None:
        raise ValidationError(f"{spec.name}: {ENV_VALIDATE}=always but no reference kernel is loaded")
    sample = Sample(args=args, attrs=dict(attrs))
    oracle = spec.oracle(sample)
    with torch.no_grad():
        ref = reference.fn(*oracle.args, **oracle.attrs)
        verdict = tuning.judge(spec, out, ref, sample)
    if not verdict.ok:
        raise ValidationError(
            f"{spec.name}: kernel {name!r} disagreed with the reference on {describe_call(spec, args, attrs)}: "
            f"{verdict.reason} (max error {verdict.max_error:.3g})")


# -- explain ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Explanation:
    """For one call: every kernel's support, verdict and time, and which one is chosen and why."""

    op: str
    call: str
    key: tuple[Any, ...]
    chosen: str | None
    why: str
    rows: tuple[tuning.Row, ...]
    failed_plugins: tuple[str, ...] = ()
    confidence: float | None = None  # P(chosen within epsilon of the fastest); None when not timed

    def table(self) -> str:
        from tabulate import tabulate

        body = [[r.backend, r.status, r.priority, _ms(r.median_ms), _err(r.max_error), r.reason] for r in self.rows]
        return tabulate(body, headers=["backend", "status", "priority", "median ms", "max error", "reason"])

    def __str__(self) -> str:
        conf = "" if self.confidence is None or "confidence" in self.why else f", confidence {self.confidence:.2f}"
        lines = [self.call, f"dispatch key: {self.key}", f"chosen: {self.chosen} ({self.why}{conf})", self.table()]
        lines += [f"failed plugin: {p}" for p in self.failed_plugins]
        return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def _err(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}"


def explain(op: str, /, *args: Any, **attrs: Any) -> Explanation:
    """What dispatch does for these inputs, resolving the key (tuning it if needed) without running it."""
    spec = get_spec(op)
    args, full = spec.prepare(args, attrs)
    key = _key(spec, args, full)
    state = _state
    forced = _forced.get() or os.environ.get(ENV_BACKEND) or None
    with state.lock:
        decision = _decision(state, spec, key, args, full)
        chosen, why, conf = decision.winner, decision.why, decision.confidence
        rows = list(decision.rows)
        for i, row in enumerate(rows):
            error = state.quarantined.get((spec.name, key, row.backend))
            if error is not None:
                rows[i] = replace(row, status="failed", reason=f"quarantined after raising on a call: {error}")
        if forced:
            chosen, why, conf = _forced_variant(spec, key, args, full, forced).name, f"forced to {forced!r}", None
        elif (spec.name, key) in state.choices:
            current = state.choices[(spec.name, key)].name
            if current != chosen:
                chosen, why, conf = current, f"next validated candidate after {decision.winner!r} was quarantined", None
    failed = tuple(f"{p.name}: {p.error}" for p in loader.get_registry().failed())
    return Explanation(op=op, call=describe_call(spec, args, full), key=key, chosen=chosen, why=why,
                       rows=tuple(rows), failed_plugins=failed, confidence=conf)
