"""The miss path: candidates -> validate against the reference -> time -> decide.

Used by the dispatcher when a dispatch key is seen for the first time, and by ``python -m
core.autotune``. A candidate is chosen only after it matched the reference on a sample of the same
kind as the call (the trust rule); timing runs on fresh synthetic inputs of the call's dispatch key,
never on the caller's tensors. For collectives (an op whose spec names a process group of several
ranks) every step runs in lockstep on every rank: verdicts and times are combined across ranks (the
slowest rank's time counts), rank 0 decides and broadcasts, and every rank records the same winner.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from core import racing
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
    source: str  # "tuned", "priority", "predicted" or "cache"
    confidence: float | None = None  # P(winner within epsilon of the fastest), for a timed decision
    final: bool = True  # False: measured under heavy contention; not cached, so a later miss retunes

    def fallbacks(self) -> list[str]:
        """Validated candidates in the order to try them: the winner, then the others fastest first, then
        by priority (the winner need not have the lowest median: a tie within epsilon goes to priority,
        and only a candidate confidently faster than the default may displace it)."""
        ok = [r for r in self.rows if r.status in ("chosen", "ok")]
        ok.sort(key=lambda r: (r.backend != self.winner, r.median_ms is None, r.median_ms or 0.0, -r.priority))
        return [r.backend for r in ok]

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.backend == name), None)


def _json_part(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


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
                    "confidence": decision.confidence,
                    "final": decision.final,  # a contended decision is kept for the record, never served
                    "key": [_json_part(k) for k in key],  # for the neighbours of unseen keys
                })
            return decision

    def _from_cache(self, spec: OpSpec, key: tuple[Any, ...], agree: Lockstep | None) -> Decision | None:
        entry = self.cache.lookup(spec.name, key) if self.cache is not None else None
        if agree is not None:
            entry = agree.broadcast(entry if agree.rank == 0 else None)
        if not entry or not entry.get("final", True) or self.variant(spec.name, entry.get("winner", "")) is None:
            return None
        try:
            rows = tuple(Row(**r) for r in entry["rows"])
        except (TypeError, KeyError):
            return None
        conf = entry.get("confidence")
        return Decision(op=spec.name, key=key, winner=entry["winner"], rows=rows,
                        why=f"from the tuning cache ({entry.get('why', '')})", source="cache",
                        confidence=conf if isinstance(conf, (int, float)) else None)

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
        conf: float | None = None
        final = True
        source = "priority"
        guess = self._predict(spec, key) if agree is None and mode != "off" and wanted is None else None
        if guess is not None and mode == "predict":
            winner = next((v for v in validated if v.name == guess.winner), None)
            if winner is not None:
                why = (f"predicted from {guess.neighbours} neighbouring decided key(s) (validated, not timed; "
                       f"shortlist {', '.join(guess.shortlist)})")
                source = "predicted"
        if mode == "off" or (mode == "predict" and winner is None and not validated):
            if validated:
                winner = max(validated, key=lambda v: v.kernel.priority)
                why = f"highest priority ({winner.kernel.priority}) of {len(validated)} validated candidates; autotuning is off"
        elif winner is None:
            sample = timing_sample or spec.synthesize(args, attrs, gen)
            default = min(timed, key=lambda v: (-v.kernel.priority, v.name)) if timed else None
            field_ = timed
            if guess is not None and len(timed) > 2:
                keep = set(guess.shortlist) | {default.name}
                field_ = [v for v in timed if v.name in keep] or timed
                for v in timed:
                    if v not in field_:
                        rows[v.name] = replace(rows[v.name], reason="not timed: off the shortlist of the neighbouring keys' "
                                               f"decisions ({', '.join(guess.shortlist)})")
            outcome = None
            for group in (field_, [v for v in validated if v not in timed]):
                if group:
                    outcome = self._race(spec, sample, group, needs_grad, budget, agree, gen, rows, progress)
                    if outcome.pick is not None:
                        break
            if (guess is not None and len(field_) < len(timed) and outcome is not None and outcome.pick is not None
                    and outcome.pick not in guess.shortlist and any(v.name == outcome.pick for v in field_)):
                # The neighbours' winners all lost here, to the default kept beside them as a fallback: their
                # prediction is contradicted (a boundary between keys, or the favourite's runs slowed by
                # something passing), so the whole field is raced, the shortlisted ones again. Before this,
                # one full sweep on the Xeon served the fallback `fused` at 2.46x SDPA's time (bfloat16 prefill
                # B=2 Hq=8 Hkv=2 L=128 D=64); the next sweep's decision for that key showed the shortlist,
                # `fused-bf16gemm` (0.16-0.20 ms in every tuning seen), beside `fused`, and the SDPA-based
                # candidates, off it, never timed.
                for v in timed:
                    rows[v.name] = replace(rows[v.name], reason="", median_ms=None, spread_ms=None)
                progress(f"the shortlist ({', '.join(guess.shortlist)}) lost to {outcome.pick}: racing every candidate")
                first, outcome = outcome, self._race(spec, sample, timed, needs_grad, budget, agree, gen, rows, progress)
                if outcome.pick is None:  # every one raised this time: the first race's pick stands
                    outcome = first
            if outcome is not None and outcome.pick is not None:
                name = outcome.pick
                if agree is not None:
                    name = agree.broadcast(name if agree.rank == 0 else None)
                winner = next(v for v in validated if v.name == name)
                # A collective's scatter is mostly the ranks' arrival skew, which is its nature rather than
                # passing load: its decision is final (every process retuning it in lockstep would cost more).
                conf, final = outcome.confidence, not outcome.contended or agree is not None
                ms = rows[name].median_ms
                timed_rows = sorted((r for r in rows.values() if r.median_ms is not None and r.backend != name),
                                    key=lambda r: r.median_ms)
                runner = f", next {timed_rows[0].backend} at {timed_rows[0].median_ms:.3g} ms" if timed_rows else ""
                n = sum(1 for r in rows.values() if r.median_ms is not None)
                why = (f"fastest of {n} validated candidates within {racing.EPSILON:.0%} at confidence {conf:.2f} "
                       f"({ms:.3g} ms{runner}; {outcome.rounds} interleaved rounds, stopped: {_STOPS[outcome.stop]})")
                if not final:
                    why += "; heavy contention (spread far beyond the differences): not stored as final"
            source = "tuned"
        if winner is not None:
            rows[winner.name] = replace(rows[winner.name], status="chosen")
        else:
            why = "no candidate both supports these inputs and matched the reference"
        ordered = tuple(rows[v.name] for v in variants)
        return Decision(op=spec.name, key=key, winner=winner.name if winner else None, rows=ordered, why=why, source=source,
                        confidence=conf, final=final)

    def _race(self, spec: OpSpec, sample: Sample, group: Sequence[Variant], needs_grad: bool, budget: float,
              agree: Lockstep | None, gen: torch.Generator, rows: dict[str, Row],
              progress: Callable[[str], None]) -> racing.Outcome:
        """Time ``group`` interleaved in rounds (core.racing) and write each one's figures into ``rows``."""
        pilot = _pilot_times(spec, sample, group, needs_grad, gen, progress) if agree is None else {}
        order = sorted(group, key=lambda v: pilot.get(v.name, 0.0))  # fastest on the pilot first
        errors: dict[str, Exception] = {}
        entrants = [racing.Entrant(name=v.name, priority=v.kernel.priority,
                                   run=_runner(v, sample, needs_grad, spec, gen, errors, burst=agree is None))
                    for v in order]
        by_name = {e.name: e for e in entrants}

        def skip_first(e: racing.Entrant, best: float | None) -> bool:
            if best is None or pilot.get(e.name, 0.0) <= HOPELESS * best * 1e3:
                return False
            e.out = (f"not timed in full: {pilot[e.name]:.3g} ms on a part of the work already exceeds "
                     f"{HOPELESS:g}x the best full time ({best * 1e3:.3g} ms)")
            return True

        default = by_name[min(group, key=lambda v: (-v.kernel.priority, v.name)).name]
        progress(f"racing {', '.join(e.name for e in entrants)}")
        outcome = racing.race(entrants, default, budget_s=budget * len(entrants), long_run_s=LONG_RUN * budget,
                              combine=(lambda xs: agree.max(*xs)) if agree is not None else None,
                              skip_first=skip_first if pilot else None)
        for e in entrants:
            row = rows[e.name]
            if e.failed:
                err = errors.get(e.name)
                why = f"raised while timed: {_describe_error(err)}" if err is not None else "raised while timed on another rank"
                rows[e.name] = replace(row, status="failed", reason=why)
            elif e.times:
                rows[e.name] = replace(row, median_ms=racing.median_ms(e), spread_ms=racing.spread_ms(e),
                                       reason=e.out or row.reason)
            elif e.out:
                rows[e.name] = replace(row, reason=e.out)
        return outcome

    def _predict(self, spec: OpSpec, key: tuple[Any, ...]) -> racing.Prediction | None:
        """A predicted winner from this process's decisions and the cache's, for keys near ``key``."""
        known: dict[tuple[Any, ...], Mapping[str, Any]] = {}
        if self.cache is not None:
            for ek, entry in self.cache.entries().items():
                if ek.startswith(spec.name + "|") and entry.get("final", True) and isinstance(entry.get("key"), list):
                    known[tuple(str(k) for k in entry["key"])] = entry
        for (op, k), d in self.decisions.items():
            # this process's own decisions count even when contended: a guess, not a cached answer
            if op == spec.name and d.winner and d.source in ("tuned", "cache"):
                known[tuple(str(part) for part in k)] = {"winner": d.winner, "rows": [r.to_json() for r in d.rows]}
        return racing.predict(spec, key, known) if known else None


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


_POISONS = (float("nan"), float("inf"), float("-inf"))


def check_data_claim(spec: OpSpec, fn: Callable[..., Any], args: tuple[Any, ...], attrs: Mapping[str, Any],
                     gen: torch.Generator) -> Verdict:
    """For a kernel that declares ``checks_data``: on copies of these inputs with one entry of one
    floating input made NaN, +inf or -inf (at a random position), wherever the spec's ``verify_data``
    rejects the copy, the kernel must raise the same ``InvalidInput`` (the dispatcher skips that pass
    for it, so a kernel that claims the check without making it would answer silently on bad data)."""
    from core.errors import InvalidInput

    if spec.verify_data is None:
        return Verdict(ok=True, max_error=0.0)
    for i, a in enumerate(args):
        if not (isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel()):
            continue
        for poison in _POISONS:
            bad = a.detach().clone()
            flat = int(torch.randint(0, bad.numel(), (), generator=gen))
            bad[tuple(int(j) for j in torch.unravel_index(torch.tensor(flat), bad.shape))] = poison
            poisoned = (*args[:i], bad, *args[i + 1:])
            try:
                spec.verify_data(poisoned, attrs)
                continue  # the rules accept this value here: nothing to claim
            except InvalidInput as e:
                want = str(e)
            where = f"input {spec.inputs[i]!r} with {poison} at flat index {flat}"
            try:
                fn(*poisoned, **attrs)
            except InvalidInput as e:
                if str(e) != want:
                    return Verdict(ok=False, reason=f"declares checks_data; on {where} it raised {e!s} instead of "
                                                    f"verify_data's {want}")
                continue
            except Exception as e:
                return Verdict(ok=False, reason=f"declares checks_data; on {where} it raised {_describe_error(e)} "
                                                f"instead of verify_data's InvalidInput ({want})")
            return Verdict(ok=False, reason=f"declares checks_data but returned on {where}, which verify_data "
                                            f"rejects ({want})")
    return Verdict(ok=True, max_error=0.0)


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
        fns = serving_calls(v)
        for exp in exps:
            for which, fn in fns.items():
                verdict, status = check_status(self.spec, fn, exp)
                if status != "ok":
                    return replace(verdict, reason=which + verdict.reason), status
                worst = max(worst, verdict.max_error)
        if v.kernel.checks_data:
            for which, fn in fns.items():
                claim = check_data_claim(self.spec, fn, exps[0].sample.args, exps[0].sample.attrs, self.gen)
                if not claim.ok:
                    return replace(claim, reason=which + claim.reason), "wrong"
        return replace(verdict, max_error=worst), status


def serving_calls(v: Variant) -> dict[str, Callable[..., Any]]:
    """What serves calls of ``v``, keyed by how a verdict's reason names it: ``fn`` (""), and for a kernel
    with a ``bind``, the function it returns, bound to the call's attributes (the dispatcher's warm
    calls). The trust rule validates each."""
    if v.kernel.bind is None:
        return {"": v.fn}

    def warm(*args: Any, **attrs: Any) -> Any:
        return v.bound(attrs)(*args)

    return {"": v.fn, "the function its bind returned ": warm}


HOPELESS = racing.HOPELESS  # a candidate this many times slower than the best so far cannot win: stop timing it
LONG_RUN = racing.LONG_RUN  # a first run this many timing budgets long is its own measure: it is not repeated
_STOPS = {"alone": "one candidate left", "confident": "the pick is confidently within epsilon of the rest",
          "tie": "the rest are within epsilon (a tie, broken by priority, then name)", "budget": "the budget",
          "none": "nothing ran"}


SHORT_RUN = 200e-6  # s: a run shorter than this is timed as a burst of back-to-back calls (their mean)
MAX_BURST = 64


def _runner(v: Variant, sample: Sample, needs_grad: bool, spec: OpSpec, gen: torch.Generator,
            errors: dict[str, Exception], burst: bool = False) -> Callable[[], float]:
    """One timed run of ``v`` (seconds); an error is kept in ``errors`` and read as an infinite time, so
    that under lockstep every rank still makes the same collectives.

    With ``burst``, a candidate whose run takes microseconds is timed, from its second run on, as the mean
    of enough back-to-back calls to fill ``SHORT_RUN`` (recounted while a burst falls short of half of
    it): one such call alone measures the clock, the grad mode's switch and cold caches more than the
    kernel (a 3 us cast read as 30 us), and would rank the candidates by their overheads. Not under
    lockstep, where every rank must make the same calls."""
    device = spec.device(sample.args, sample.attrs)
    args = sample.args
    if needs_grad:
        args = tuple(a.detach().requires_grad_(True) if i in spec.grad_inputs else a for i, a in enumerate(args))
    fn, attrs = v.fn, sample.attrs
    calls = [1]

    def run() -> float:
        if v.name in errors:
            return float("inf")
        n = calls[0]
        t0 = time.perf_counter()
        try:
            with torch.enable_grad() if needs_grad else torch.no_grad():
                for _ in range(n):
                    out = fn(*args, **attrs)
                    if needs_grad and spec.grad_outputs is not None:
                        pairs = [(o, g) for o, g in zip(_leaves(out), _leaves(spec.grad_outputs(out, gen)))
                                 if g is not None]
                        torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
            _sync(device)
        except Exception as e:
            errors[v.name] = e
            return float("inf")
        t = (time.perf_counter() - t0) / n
        if burst and n < MAX_BURST and t * n < SHORT_RUN / 2:  # a cold first run understates the calls needed
            calls[0] = min(MAX_BURST, math.ceil(SHORT_RUN / max(t, 1e-7)))
        return t
    return run


def _pilot_times(spec: OpSpec, sample: Sample, candidates: Sequence[Variant], needs_grad: bool, gen: torch.Generator,
                 progress: Callable[[str], None]) -> dict[str, float]:
    """Each candidate's time (ms) for one run on ``spec.pilot``'s part of the timing sample, when the
    spec has one and the sample is big enough for it; a candidate that raises there gets no entry
    (the race will meet the error)."""
    part = spec.pilot(sample, gen) if spec.pilot is not None and len(candidates) > 1 else None
    if part is None:
        return {}
    times: dict[str, float] = {}
    errors: dict[str, Exception] = {}
    for v in candidates:
        progress(f"pilot {v.name}")
        t = _runner(v, part, needs_grad, spec, gen, errors)()
        if t != float("inf"):
            times[v.name] = t * 1e3
    return times
