"""OpSpec: the frozen record every op fills in, and the small records that flow around it.

An op is written down once, in ``core/ops/<op>.py``: its inputs and attributes, how bad input is
rejected, what the output looks like, the dispatch key, the samples the tuner validates and times on,
and the rule that says whether a kernel's answer matches the reference. The dispatcher and the tuner
know no op by name; everything op-specific reaches them through these fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from core.errors import InvalidInput


class _Required:
    __slots__ = ()

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of an attribute the caller must pass."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Attr:
    """A keyword attribute of an op, with its default (``REQUIRED`` when there is none)."""

    name: str
    default: Any = REQUIRED
    doc: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One call's worth of inputs: positional tensors and keyword attributes, defaults filled."""

    args: tuple[Any, ...]
    attrs: Mapping[str, Any]
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """A compare rule's answer: did the kernel match, by how much did it miss, and why not."""

    ok: bool
    max_error: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorMeta:
    """The shape and dtype an output must have; ``infer`` returns a pytree of these."""

    shape: tuple[int, ...]
    dtype: torch.dtype


CaseFactory = Callable[[torch.Generator, str], Sample]
"""Builds a named sample from a seeded CPU generator and a device type ("cpu" or "cuda")."""


def _no_group(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> Any:
    return None


def _identity_sample(sample: Sample) -> Sample:
    return sample


def _never(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> bool:
    return False


@dataclass(frozen=True, slots=True, kw_only=True)
class OpSpec:
    """The single written definition of one op.

    Field contracts (``args`` is the tuple of inputs, ``attrs`` the dict of attributes, defaults filled):

    - ``verify(args, attrs)``: raise ``InvalidInput`` for bad input; may resolve derived defaults by
      writing into ``attrs`` (attention fills ``scale``). Cheap: reads no tensor data unless the
      contract demands it. It may return the dispatch key it built from the sizes it read (the same
      tuple as ``key``), which the hot path then uses instead of calling ``key``; ``None`` otherwise.
    - ``verify_data(args, attrs)``: optional; the rules that read the inputs' values (a pass over the
      data, such as nearest_neighbor's finite check), run after ``verify``. The dispatcher skips it when
      the kernel it serves declares ``checks_data`` (it finds the same violations in its own pass and
      raises the same ``InvalidInput``); ``prepare`` always runs it.
    - ``key(args, attrs)``: the dispatch key, a hashable tuple (device, dtypes, bucketed shapes, the
      attributes that change the kernel) of JSON scalars or objects whose ``str`` is stable (a
      ``torch.device``, a ``torch.dtype``): the cache stores it as JSON through ``str``.
    - ``fast_key(args, attrs)``: optional; a cheap hashable summary of everything ``verify`` and ``key``
      read (types included, where ``True == 1`` would otherwise pass for an int), or ``None`` for a
      call it does not summarize. Two calls with equal fast keys must pass ``verify`` alike, with the
      same canonical attributes and the same dispatch key: the dispatcher then serves a repeated call
      of a warm key from its memo of fast keys, skipping both (see ``core.dispatcher``). It never
      raises.
    - ``key_sizes``: the indices of the key's bucketed size parts; the tuner predicts an unseen key's
      winner from decided keys equal in every other part and near in these.
    - ``device(args, attrs)`` / ``dtypes(args, attrs)``: what a kernel's declared devices and dtypes
      are checked against.
    - ``infer(args, attrs)``: a pytree (tuple / list / namedtuple) of ``TensorMeta`` the output must
      match, or ``None`` where the output structure cannot be known ahead.
    - ``shrink(args, attrs, gen)``: a small sample of the same kind (the same key features, sizes the
      reference handles quickly), on fresh random data: what a kernel is validated on.
    - ``synthesize(args, attrs, gen)``: fresh random inputs of the same dispatch key: what candidates
      are timed on. Never the caller's tensors.
    - ``oracle(sample)``: the inputs the reference is run on to judge ``sample`` (attention lifts them
      to float64); identity by default.
    - ``fits_reference(args, attrs)``: whether the reference answers inputs of this size quickly
      (well under a second, gradients included). Then every candidate is validated on a full-size
      synthesized sample as well as on the shrunk one, so a kernel right only at small sizes is caught;
      the shrunk sample alone is for inputs too big for the reference. Never, by default.
    - ``pilot(sample, gen)``: optional; a part of the timing sample's work (some of its independent
      pieces, such as a sixteenth of the queries), or ``None`` when the sample is too small to be
      worth it. Every candidate runs once on it; one whose pilot run alone takes over 3x the best
      full-size time so far is not timed in full (no kernel does the whole in less time than a part
      of it). It orders the full timing too, fastest on the pilot first.
    - ``compare(out, ref, sample)``: the compare rule, returning a ``Verdict`` with the max error.
    - ``cases`` / ``edge_cases``: named sample factories; ``cases`` are what ``python -m
      core.autotune`` tunes by default, ``edge_cases`` what the conformance kit adds.
    - ``grad_inputs``: the indices of differentiable inputs; with ``grad_outputs(out, gen)`` giving
      cotangents (``None`` for an output without one) and ``compare_grads(grads, ref_grads, sample,
      grad_outputs)``.
    - ``compare_checks_nan``: the compare rule judges NaN itself (a cast's overflow may legitimately
      be NaN where another valid rounding is finite), so the generic "NaN where the reference has
      none" check is skipped.
    - ``group(args, attrs)``: the process group a collective runs over (``None`` for ordinary ops);
      when it has more than one rank the tuner works in lockstep on every rank.
    """

    name: str
    summary: str
    inputs: tuple[str, ...]
    attrs: tuple[Attr, ...]
    verify: Callable[[tuple[Any, ...], dict[str, Any]], None]
    verify_data: Callable[[tuple[Any, ...], Mapping[str, Any]], None] | None = None
    key: Callable[[tuple[Any, ...], Mapping[str, Any]], tuple[Any, ...]]
    fast_key: Callable[[tuple[Any, ...], Mapping[str, Any]], Any] | None = None
    key_sizes: tuple[int, ...] = ()
    device: Callable[[tuple[Any, ...], Mapping[str, Any]], str]
    dtypes: Callable[[tuple[Any, ...], Mapping[str, Any]], tuple[torch.dtype, ...]]
    infer: Callable[[tuple[Any, ...], Mapping[str, Any]], Any]
    shrink: Callable[[tuple[Any, ...], Mapping[str, Any], torch.Generator], Sample]
    synthesize: Callable[[tuple[Any, ...], Mapping[str, Any], torch.Generator], Sample]
    compare: Callable[[Any, Any, Sample], Verdict]
    cases: Mapping[str, CaseFactory]
    edge_cases: Mapping[str, CaseFactory] = field(default_factory=dict)
    oracle: Callable[[Sample], Sample] = _identity_sample
    pilot: Callable[[Sample, torch.Generator], Sample | None] | None = None
    fits_reference: Callable[[tuple[Any, ...], Mapping[str, Any]], bool] = _never
    grad_inputs: tuple[int, ...] = ()
    grad_outputs: Callable[[Any, torch.Generator], Sequence[Any]] | None = None
    compare_grads: Callable[[Sequence[Any], Sequence[Any], Sample, Sequence[Any]], Verdict] | None = None
    group: Callable[[tuple[Any, ...], Mapping[str, Any]], Any] = _no_group
    collective: bool = False
    compare_checks_nan: bool = False
    _defaults: dict[str, Any] = field(init=False, repr=False, compare=False)
    _required: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _known: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        defaults = {a.name: a.default for a in self.attrs if a.default is not REQUIRED}
        object.__setattr__(self, "_defaults", defaults)
        object.__setattr__(self, "_required", tuple(a.name for a in self.attrs if a.default is REQUIRED))
        object.__setattr__(self, "_known", frozenset(a.name for a in self.attrs))

    @property
    def attr_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attrs)

    def bind(self, args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Match a call to the op's inputs and attributes, filling defaults; the hot path's first step."""
        if len(args) != len(self.inputs):
            args, attrs = self._inputs_from_keywords(args, attrs)
        full = {**self._defaults, **attrs}
        # as many keys as the op has attributes, none unknown: then every required one is there
        if len(full) != len(self._known) or not full.keys() <= self._known:
            self._check_attr_names(full)
        return args, full

    def _inputs_from_keywords(self, args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if len(args) > len(self.inputs):
            raise InvalidInput(
                f"{self.name}: expected {len(self.inputs)} positional inputs "
                f"({', '.join(self.inputs)}), got {len(args)}; attributes are keyword-only"
            )
        rest = dict(attrs)
        filled = list(args)
        for name in self.inputs[len(args):]:
            if name not in rest:
                raise InvalidInput(f"{self.name}: argument {name!r}: expected a value, got nothing")
            filled.append(rest.pop(name))
        return tuple(filled), rest

    def _check_attr_names(self, full: Mapping[str, Any]) -> None:
        known = set(self.attr_names)
        for name in full:
            if name not in known:
                raise InvalidInput(
                    f"{self.name}: argument {name!r}: expected one of the attributes "
                    f"{sorted(known)}, got an unknown keyword"
                )
        for name in self._required:
            if name not in full:
                raise InvalidInput(f"{self.name}: argument {name!r}: expected a value (it is required), got nothing")

    def prepare(self, args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """bind, then verify (and verify_data): the inputs exactly as a kernel receives them."""
        args, full = self.bind(args, attrs)
        self.verify(args, full)
        if self.verify_data is not None:
            self.verify_data(args, full)
        return args, full


# Helpers the op specs share.

def bucket(n: int) -> int:
    """Dispatch-key bucket of a size: 0 and 1 stay themselves, others round up to a power of two."""
    return n if n <= 1 else 1 << (n - 1).bit_length()


def device_type(t: torch.Tensor) -> str:
    """``t.device.type``, a fifth of its cost for CPU and CUDA tensors (``.device.type`` takes about 0.2 us,
    a sizeable part of a small call's hot path)."""
    return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(value: Any) -> str:
    """A short, safe description of an argument for error messages and explain tables."""
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={dtype_name(value.dtype)}, device={value.device.type})"
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"{type(value).__name__}[{len(value)} items]"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{', '.join(describe(v) for v in value)}]"
    return repr(value)


def describe_call(spec: OpSpec, args: Sequence[Any], attrs: Mapping[str, Any]) -> str:
    parts = [f"{n}={describe(a)}" for n, a in zip(spec.inputs, args)]
    parts += [f"{n}={describe(v)}" for n, v in attrs.items()]
    return f"{spec.name}({', '.join(parts)})"


def require_tensor(op: str, arg: str, value: Any) -> torch.Tensor:
    """``value`` when it is a dense (strided) tensor, else the InvalidInput naming op and argument."""
    if not isinstance(value, torch.Tensor):
        raise InvalidInput(f"{op}: argument {arg!r}: expected a torch.Tensor, got {type(value).__name__}")
    if value.layout is not torch.strided:  # sparse, mkldnn, ...: no kernel reads them
        raise InvalidInput(f"{op}: argument {arg!r}: expected a dense (strided) tensor, got layout {value.layout}")
    return value


def reads_data(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values now. Not on a FakeTensor or meta tensor (torch.compile
    traces the op's fake implementation with those; the custom op's real implementation runs the check
    on the real tensors at run time), nor on a CUDA tensor while its stream is captured into a CUDA
    graph (a read would synchronize, which capture forbids). A plain CPU tensor answers at once."""
    if type(t) is not torch.Tensor and (t.is_meta or _is_fake(t)):
        return False
    if t.is_meta:
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(t))


def unknown_size(low: int, high: Any = None) -> Any:
    """A size only the data decides, for an ``infer`` run by the fake implementation (an unbacked
    symbolic size in ``[low, high]``; ``high`` may be symbolic, then only ``low`` bounds it)."""
    ctx = torch.library.get_ctx()
    return ctx.new_dynamic_size(min=low, max=high if isinstance(high, int) else None)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in float64, where positions both non-finite and equal count as 0."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    if a64.numel() == 0:
        return 0.0
    same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
    diff = torch.where(same, torch.zeros_like(a64), (a64 - b64).abs())
    diff = torch.nan_to_num(diff, nan=math.inf)
    return float(diff.max())
