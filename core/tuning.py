"""The miss path: candidates -> validate against the reference -> time -> decide.

Used by the dispatcher when a dispatch key is seen for the first time, and by ``python -m
core.autotune``. A candidate is chosen only after it matched the reference on a sample of the same
kind as the call (the trust rule); timing runs on fresh synthetic inputs of the call's dispatch key,
never on the caller's tensors. For collectives (an op whose spec names a process group of several
ranks) every step runs in lockstep on every rank: verdicts and times are combined across ranks (the
slowest rank's time counts), rank 0 decides and broadcasts, and every rank records the same winner.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from core.cache import TuningCache, fingerprint
from core.spec import OpSpec, Sample, TensorMeta, Verdict
from registry.kernel import Kernel, Variant
from registry.loader import Registry, get_registry

STATUSES = ("chosen", "ok", "wrong", "failed", "unsupported")
DEFAULT_LAZY_BUDGET = 0.1


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One candidate's fate for one dispatch key."""

    backend: str
    status: str
    median_ms: float | None = None
    spread_ms: float | None = None
    max_error: float | None = None
    reason: str = ""
    priority: int = 0

    def to_json(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What the tuner decided for one (op, dispatch key), with every row that justified it."""

    op: str
    key: tuple[Any, ...]
    winner: str | None
    rows: tuple[Row, ...]
    why: str
    source: str  # "tuned", "priority" or "cache"

    def fallbacks(self) -> list[str]:
        """Validated candidates in the order to try them: fastest first, then by priority."""
        ok = [r for r in self.rows if r.status in ("chosen", "ok")]
        ok.sort(key=lambda r: (r.median_ms is None, r.median_ms or 0.0, -r.priority))
        return [r.backend for r in ok]

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.backend == name), None)


def _describe_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def structure_problem(out: Any, meta: Any, path: str = "output") -> str | None:
    """Why ``out`` does not have the structure, shapes and dtypes ``meta`` describes, or None."""
    if meta is None:
        return None
    if isinstance(meta, TensorMeta):
        if not isinstance(out, torch.Tensor):
            return f"{path}: expected a tensor, got {type(out).__name__}"
        if tuple(out.shape) != tuple(meta.shape):
            return f"{path}: expected shape {tuple(meta.shape)}, got {tuple(out.shape)}"
        if out.dtype != meta.dtype:
            return f"{path}: expected dtype {meta.dtype}, got {out.dtype}"
        return None
    if isinstance(meta, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(meta):
            got = f"{type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
            return f"{path}: expected a sequence of {len(meta)}, got {got}"
        for i, (o, m) in enumerate(zip(out, meta)):
            problem = structure_problem(o, m, f"{path}[{i}]")
            if problem:
                return problem
    return None


def nan_problem(out: Any, ref: Any) -> str | None:
    """NaN in the kernel's output where the reference has none."""
    for i, (o, r) in enumerate(zip(_leaves(out), _leaves(ref))):
        if isinstance(o, torch.Tensor) and isinstance(r, torch.Tensor) and o.is_floating_point() and o.shape == r.shape:
            bad = torch.isnan(o.detach().cpu().double()) & ~torch.isnan(r.detach().cpu().double())
            if bool(bad.any()):
                return f"output[{i}] has {int(bad.sum())} NaN where the reference has none"
    return None


def judge(spec: OpSpec, out: Any, ref: Any, sample: Sample) -> Verdict:
    """The whole validation of one output: structure, NaN, then the op's compare rule."""
    problem = structure_problem(out, spec.infer(sample.args, sample.attrs))
    if problem is None and not spec.compare_checks_nan:
        problem = nan_problem(out, ref)
    if problem is not None:
        return Verdict(ok=False, max_error=float("inf"), reason=problem)
    return spec.compare(out, ref, sample)


class Lockstep:
    """Agreement across the ranks of a process group: every call is a collective on every rank."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        from core import distributed

        self.dist = dist
        self.group = group
        self.rank = distributed.rank(group)
        self.root = distributed.global_rank(group, 0)
        self.device = distributed.collective_device(group)

    def _reduce(self, values: Sequence[float], op: Any) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, op=op, group=self.group)
        return t.cpu().tolist()

    def max(self, *values: float) -> list[float]:
        return self._reduce(values, self.dist.ReduceOp.MAX)

    def all(self, *flags: bool) -> list[bool]:
        return [v > 0.5 for v in self._reduce([1.0 if f else 0.0 for f in flags], self.dist.ReduceOp.MIN)]

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=self.root, group=self.group)
        return box[0]


def lockstep_for(spec: OpSpec, args: tuple[Any, ...], attrs: Mapping[str, Any]) -> Lockstep | None:
    group = spec.group(args, attrs)
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) <= 1:
        return None
    return Lockstep(group)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def new_tuner(*, use_cache: bool) -> Tuner:
    """A tuner over the loaded registry, with this environment's tuning cache unless ``use_cache`` is off."""
    reg = get_registry()
    return Tuner(reg, TuningCache(None, fingerprint(reg.versions())) if use_cache else None)


class Tuner:
    """Validates, times and decides; keeps every verdict and decision in memory and in the cache."""

    def __init__(self, registry: Registry, cache: TuningCache | None, *, seed: int | None = None) -> None:
        self.registry = registry
        self.cache = cache
        self.decisions: dict[tuple[str, tuple[Any, ...]], Decision] = {}
        self._seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        self._count = 0
        self._lock = threading.RLock()

    def variants(self, op: str) -> list[Variant]:
        return [v for k in self.registry.kernels_for(op) for v in k.variants()]

    def variant(self, op: str, name: str) -> Variant | None:
        for v in self.variants(op):
            if v.name == name:
                return v
        return None

    def _generator(self, agree: Lockstep | None) -> torch.Generator:
        self._count += 1
        rank = agree.rank if agree is not None else 0
        return torch.Generator().manual_seed((self._seed * 1_000_003 + self._count * 7919 + rank) % (2**63))

    def reasons(self, spec: OpSpec, kernel: Kernel, args: tuple[Any, ...], attrs: Mapping[str, Any], needs_grad: bool) -> list[str]:
        reasons = kernel.reasons_for(spec, args, attrs)
        if needs_grad and not kernel.differentiable:
            reasons.append("it is not differentiable and the inputs require grad")
        return reasons

    # -- the whole miss path -------------------------------------------------------------------------
    def decide(
        self,
        spec: OpSpec,
        key: tuple[Any, ...],
        args: tuple[Any, ...],
        attrs: Mapping[str, Any],
        *,
        needs_grad: bool = False,
        mode: str = "lazy",
        budget: float = DEFAULT_LAZY_BUDGET,
        backends: Iterable[str] | None = None,
        time_reference: bool = False,
        timing_sample: Sample | None = None,
        use_cache: bool = True,
        store: bool | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Decision:
        """Decide the kernel for one dispatch key (or take the cached decision of this environment).

        ``use_cache`` reads the cache first; ``store`` (default: ``use_cache``) writes the decision.
        A decision restricted to some ``backends`` is never stored.
        """
        store = use_cache if store is None else store
        with self._lock:
            if self.cache is not None and self.cache.fingerprint.get("threads") != torch.get_num_threads():
                # torch.set_num_threads since the cache was opened: decisions belong to the new count
                self.cache = TuningCache(self.cache.directory, {**self.cache.fingerprint, "threads": torch.get_num_threads()})
            agree = lockstep_for(spec, args, attrs)
            wanted = set(backends) if backends is not None else None
            if use_cache and wanted is None:
                cached = self._from_cache(spec, key, agree)
                if cached is not None:
                    self.decisions[(spec.name, key)] = cached
                    return cached
            decision = self._tune(spec, key, args, attrs, needs_grad, mode, budget, wanted, time_reference,
                                  timing_sample, agree, progress or (lambda s: None))
            self.decisions[(spec.name, key)] = decision
            # Only a timed decision is stored: an untimed priority pick (autotuning off) must not later
            # pass for a tuned winner.
            if store and self.cache is not None and wanted is None and decision.source == "tuned" and decision.winner:
                self.cache.store(spec.name, key, {
                    "winner": decision.winner,
                    "why": decision.why,
                    "rows": [r.to_json() for r in decision.rows],
                })
            return decision

    def _from_cache(self, spec: OpSpec, key: tuple[Any, ...], agree: Lockstep | None) -> Decision | None:
        entry = self.cache.lookup(spec.name, key) if self.cache is not None else None
        if agree is not None:
            entry = agree.broadcast(entry if agree.rank == 0 else None)
        if not entry or self.variant(spec.name, entry.get("winner", "")) is None:
            return None
        try:
            rows = tuple(Row(**r) for r in entry["rows"])
        except (TypeError, KeyError):
            return None
        return Decision(op=spec.name, key=key, winner=entry["winner"], rows=rows,
                        why=f"from the tuning cache ({entry.get('why', '')})", source="cache")

    def _tune(self, spec: OpSpec, key: tuple[Any, ...], args: tuple[Any, ...], attrs: Mapping[str, Any],
              needs_grad: bool, mode: str, budget: float, wanted: set[str] | None, time_reference: bool,
              timing_sample: Sample | None, agree: Lockstep | None, progress: Callable[[str], None]) -> Decision:
        gen = self._generator(agree)
        variants = [v for v in self.variants(spec.name) if wanted is None or v.name in wanted or v.kernel.backend in wanted]
        rows: dict[str, Row] = {}
        supported: list[Variant] = []
        for v in variants:
            reasons = self.reasons(spec, v.kernel, args, attrs, needs_grad)
            if agree is not None:
                (everywhere,) = agree.all(not reasons)
                if not everywhere and not reasons:
                    reasons = ["not supported on another rank"]
            if reasons:
                rows[v.name] = Row(backend=v.name, status="unsupported", reason="; ".join(reasons), priority=v.kernel.priority)
            else:
                supported.append(v)

        validator = _Validator(self, spec, args, attrs, needs_grad, gen, agree)
        validated: list[Variant] = []
        for v in supported:
            progress(f"validating {v.name}")
            verdict, status = validator.run(v)
            if agree is not None:
                (ok_everywhere,) = agree.all(status == "ok")
                (err,) = agree.max(verdict.max_error if verdict.max_error == verdict.max_error else float("inf"))
                if status == "ok" and not ok_everywhere:
                    status, verdict = "wrong", replace(verdict, ok=False, reason="disagreed with the reference on another rank")
                verdict = replace(verdict, max_error=err)
            rows[v.name] = Row(backend=v.name, status=status, max_error=verdict.max_error, reason=verdict.reason,
                               priority=v.kernel.priority)
            if status == "ok":
                validated.append(v)

        timed = [v for v in validated if time_reference or v.kernel.backend != "reference"] or validated
        winner: Variant | None = None
        why = ""
        if mode == "off":
            if validated:
                winner = max(validated, key=lambda v: v.kernel.priority)
                why = f"highest priority ({winner.kernel.priority}) of {len(validated)} validated candidates; autotuning is off"
            source = "priority"
        else:
            sample = timing_sample or spec.synthesize(args, attrs, gen)
            pilot = _pilot_times(spec, sample, timed, needs_grad, gen, progress) if agree is None else {}
            times: dict[str, tuple[float, float]] = {}
            # The reference is timed last, and only when nothing else survived timing. With a pilot, the
            # fastest on it go first, so that the cutoffs below meet the slow ones.
            for group in (timed, [v for v in validated if v not in timed]):
                if times:
                    break
                for v in sorted(group, key=lambda v: pilot.get(v.name, 0.0)):
                    best = min((t[0] for t in times.values()), default=None)
                    if best is not None and pilot.get(v.name, 0.0) > HOPELESS * best:
                        rows[v.name] = replace(rows[v.name], reason=(
                            f"not timed in full: {pilot[v.name]:.3g} ms on a part of the work already exceeds "
                            f"{HOPELESS:g}x the best full time ({best:.3g} ms)"))
                        continue
                    progress(f"timing {v.name}")
                    try:
                        times[v.name] = _measure(v.fn, sample, needs_grad, spec, budget, agree, gen,
                                                 hopeless_s=None if best is None else HOPELESS * best / 1e3)
                    except Exception as e:
                        rows[v.name] = replace(rows[v.name], status="failed",
                                               reason=f"raised while timed: {_describe_error(e)}")
                        continue
                    rows[v.name] = replace(rows[v.name], median_ms=times[v.name][0], spread_ms=times[v.name][1])
            if times:
                order = sorted(times, key=lambda n: times[n][0])
                name = order[0]
                if agree is not None:
                    name = agree.broadcast(name if agree.rank == 0 else None)
                winner = next(v for v in validated if v.name == name)
                runner = f", next {order[1]} at {times[order[1]][0]:.3g} ms" if len(order) > 1 else ""
                why = f"fastest of {len(times)} validated candidates ({times[name][0]:.3g} ms{runner})"
            source = "tuned"
        if winner is not None:
            rows[winner.name] = replace(rows[winner.name], status="chosen")
        else:
            why = "no candidate both supports these inputs and matched the reference"
        ordered = tuple(rows[v.name] for v in variants)
        return Decision(op=spec.name, key=key, winner=winner.name if winner else None, rows=ordered, why=why, source=source)


@dataclass(frozen=True, slots=True, kw_only=True)
class Expected:
    """The reference's answer for one sample: what a candidate is judged against."""

    sample: Sample
    ref: Any
    grad_outputs: Any = None
    ref_grads: Any = None


def expected(spec: OpSpec, reference: Kernel, sample: Sample, needs_grad: bool, gen: torch.Generator) -> Expected:
    """Run the reference (on ``spec.oracle(sample)``), and its gradient oracle when grads are checked."""
    oracle = spec.oracle(sample)
    with torch.no_grad():
        ref = reference.fn(*oracle.args, **oracle.attrs)
    if needs_grad and spec.grad_outputs is not None and reference.backward is not None:
        gouts = spec.grad_outputs(ref, gen)
        return Expected(sample=sample, ref=ref, grad_outputs=gouts,
                        ref_grads=reference.backward(oracle.args, oracle.attrs, gouts))
    return Expected(sample=sample, ref=ref)


def check(spec: OpSpec, fn: Callable[..., Any], exp: Expected) -> Verdict:
    """Run ``fn`` on the sample and judge it (gradients too when ``exp`` has them). Kernel errors propagate."""
    sample = exp.sample
    if exp.ref_grads is None:
        with torch.no_grad():
            out = fn(*sample.args, **sample.attrs)
        return judge(spec, out, exp.ref, sample)
    idx = spec.grad_inputs
    inputs = [a.detach().clone().requires_grad_(True) if i in idx else a for i, a in enumerate(sample.args)]
    with torch.enable_grad():
        out = fn(*inputs, **sample.attrs)
    verdict = judge(spec, out, exp.ref, sample)
    if not verdict.ok:
        return verdict
    pairs = [(o, g) for o, g in zip(_leaves(out), _leaves(exp.grad_outputs)) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in idx],
                                [g.to(device=o.device, dtype=o.dtype) for o, g in pairs], allow_unused=True)
    assert spec.compare_grads is not None
    gverdict = spec.compare_grads(grads, exp.ref_grads, sample, exp.grad_outputs)
    if not gverdict.ok:
        return replace(gverdict, reason=f"gradients: {gverdict.reason}")
    return replace(verdict, max_error=max(verdict.max_error, gverdict.max_error))


def check_status(spec: OpSpec, fn: Callable[..., Any], exp: Expected) -> tuple[Verdict, str]:
    """``check`` with the kernel's exceptions turned into a ``failed`` verdict: (verdict, status)."""
    try:
        verdict = check(spec, fn, exp)
    except Exception as e:
        return Verdict(ok=False, max_error=float("inf"), reason=f"raised {_describe_error(e)}"), "failed"
    return verdict, "ok" if verdict.ok else "wrong"


class _Validator:
    """Runs candidates on one shared validation sample and judges them against the reference."""

    def __init__(self, tuner: Tuner, spec: OpSpec, args: tuple[Any, ...], attrs: Mapping[str, Any], needs_grad: bool,
                 gen: torch.Generator, agree: Lockstep | None) -> None:
        self.tuner, self.spec, self.args, self.attrs = tuner, spec, args, attrs
        self.needs_grad, self.gen, self.agree = needs_grad, gen, agree
        self.reference = tuner.registry.reference(spec.name)
        self._expected: dict[str, Expected] = {}

    def _expected_for(self, which: str) -> Expected:
        """The reference's answer on the small sample, or on a full-size one ("full": where a kernel does
        not support the small one, or where the spec says the reference is quick at the caller's size)."""
        if which not in self._expected:
            make = self.spec.shrink if which == "small" else self.spec.synthesize
            assert self.reference is not None
            self._expected[which] = expected(self.spec, self.reference, make(self.args, self.attrs, self.gen),
                                             self.needs_grad, self.gen)
        return self._expected[which]

    def run(self, v: Variant) -> tuple[Verdict, str]:
        if self.reference is None:
            return Verdict(ok=False, reason="no reference kernel is loaded for this op, so nothing can be validated"), "failed"
        if v.kernel is self.reference:
            return Verdict(ok=True, max_error=0.0), "ok"
        try:
            exps = [self._expected_for("small")]
            if self.tuner.reasons(self.spec, v.kernel, exps[0].sample.args, exps[0].sample.attrs, self.needs_grad):
                exps = [self._expected_for("full")]
            elif self.spec.fits_reference(self.args, self.attrs):
                exps.append(self._expected_for("full"))  # the caller's size too, where the reference is quick
        except Exception as e:
            return Verdict(ok=False, reason=f"the reference raised {_describe_error(e)}, so nothing can be validated"), "failed"
        worst = 0.0
        for exp in exps:
            verdict, status = check_status(self.spec, v.fn, exp)
            if status != "ok":
                return verdict, status
            worst = max(worst, verdict.max_error)
        return replace(verdict, max_error=worst), status


HOPELESS = 3.0  # a candidate this many times slower than the best so far cannot win: stop timing it
LONG_RUN = 10.0  # a first run this many timing budgets long is its own measure: it is not repeated


def _pilot_times(spec: OpSpec, sample: Sample, candidates: Sequence[Variant], needs_grad: bool, gen: torch.Generator,
                 progress: Callable[[str], None]) -> dict[str, float]:
    """Each candidate's time (ms) for one run on ``spec.pilot``'s part of the timing sample, when the
    spec has one and the sample is big enough for it; a candidate that raises there gets no entry
    (the full timing will meet the error)."""
    part = spec.pilot(sample, gen) if spec.pilot is not None and len(candidates) > 1 else None
    if part is None:
        return {}
    times: dict[str, float] = {}
    for v in candidates:
        progress(f"pilot {v.name}")
        try:
            # hopeless_s=0: any first run exceeds it, so _measure times exactly one run
            times[v.name] = _measure(v.fn, part, needs_grad, spec, 0.0, None, gen, hopeless_s=0.0)[0]
        except Exception:
            continue
    return times


def _measure(fn: Callable[..., Any], sample: Sample, needs_grad: bool, spec: OpSpec, budget: float,
             agree: Lockstep | None, gen: torch.Generator, hopeless_s: float | None = None) -> tuple[float, float]:
    """(median, interquartile spread) in milliseconds; with lockstep, the slowest rank's figures.

    A candidate whose first run already takes longer than ``hopeless_s`` (three times the best
    median so far) cannot win: that one run is its time, and it is not repeated. Nor is a first run
    of LONG_RUN budgets or more: warm-up effects are small beside it."""
    device = spec.device(sample.args, sample.attrs)
    args = sample.args
    if needs_grad:
        args = tuple(a.detach().requires_grad_(True) if i in spec.grad_inputs else a for i, a in enumerate(args))

    def once() -> None:
        out = fn(*args, **sample.attrs)
        if needs_grad and spec.grad_outputs is not None:
            pairs = [(o, g) for o, g in zip(_leaves(out), _leaves(spec.grad_outputs(out, gen))) if g is not None]
            torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])

    ctx = torch.enable_grad() if needs_grad else torch.no_grad()
    # Under lockstep every rank makes the same collectives whatever happens locally: an error is
    # held, signalled as an infinite time, and raised on every rank once all of them know.
    error: Exception | None = None
    samples: list[float] = []
    with ctx:
        t0 = time.perf_counter()
        try:
            once()
            _sync(device)
            first = time.perf_counter() - t0
        except Exception as e:
            if agree is None:
                raise
            error, first = e, float("inf")
        if agree is not None:
            (first,) = agree.max(first)
        if first != float("inf") and ((hopeless_s is not None and first > hopeless_s) or first >= LONG_RUN * budget > 0):
            samples.append(first * 1e3)
        elif first != float("inf"):
            reps = 1 if first >= budget else max(3, min(200, int(budget / max(first, 1e-7))))
            for _ in range(reps):
                t0 = time.perf_counter()
                try:
                    once()
                    _sync(device)
                except Exception as e:
                    if agree is None:
                        raise
                    error = e
                    break
                samples.append((time.perf_counter() - t0) * 1e3)
    median = statistics.median(samples) if samples and error is None else float("inf")
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [median, median, median]
    spread = q[2] - q[0] if median != float("inf") else 0.0
    if agree is not None:
        median, spread = agree.max(median, spread)
    if median == float("inf"):
        raise error if error is not None else RuntimeError("raised on another rank while timed")
    return median, spread
