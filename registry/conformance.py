"""The conformance kit: run every kernel of a backend against the reference on the spec's cases.

A third-party backend writes one test file::

    import pytest
    from registry.conformance import conformance_cases, check_case

    @pytest.mark.parametrize("case", conformance_cases("acme"), ids=str)
    def test_acme_conforms(case):
        check_case(case)  # raises core.errors.ValidationError with the reason on a mismatch

or calls ``check_backend("acme")`` for a report of every (op, kernel, case). The same rules as the
dispatcher's validation apply (output structure, no NaN where the reference has none, the op's
compare rule, gradients for differentiable kernels, and for a kernel that declares ``checks_data`` the
InvalidInput of the spec's ``verify_data`` on NaN and inf inputs), on the spec's default cases and edge cases,
with fresh random inputs each run. A case the kernel declares unsupported is reported as such,
never as a pass.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch

from core.errors import ValidationError
from core.ops import get_spec
from core.tuning import check_data_claim, check_status, expected, serving_calls
from registry.kernel import Variant
from registry.loader import Registry, get_registry


@dataclass(frozen=True, slots=True)
class ConformanceCase:
    """One (op, kernel variant, named case) to check."""

    op: str
    variant: str
    case: str
    device: str = "cpu"

    def __str__(self) -> str:
        return f"{self.op}-{self.variant}-{self.case}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseResult:
    case: ConformanceCase
    status: str  # "ok", "wrong", "failed" or "unsupported"
    max_error: float | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Every case's result for one backend."""

    backend: str
    results: tuple[CaseResult, ...]

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.status in ("wrong", "failed")]

    @property
    def ok(self) -> bool:
        return not self.failures and any(r.status == "ok" for r in self.results)

    def __str__(self) -> str:
        from tabulate import tabulate

        rows = [[r.case.op, r.case.variant, r.case.case, r.status, "" if r.max_error is None else f"{r.max_error:.3g}", r.reason]
                for r in self.results]
        return tabulate(rows, headers=["op", "kernel", "case", "status", "max error", "reason"])


def _variants(registry: Registry, backend: str, ops: Iterable[str] | None) -> list[Variant]:
    wanted = set(ops) if ops is not None else None
    kernels = [k for op, ks in registry.kernels.items() if wanted is None or op in wanted for k in ks]
    chosen = [k for k in kernels if k.backend == backend] or [k for k in kernels if k.plugin == backend]
    return [v for k in chosen for v in k.variants()]


def conformance_cases(backend: str, *, ops: Iterable[str] | None = None, device: str = "cpu",
                      registry: Registry | None = None) -> list[ConformanceCase]:
    """Every (op, variant, case) of a backend (a backend name or a plugin name), for ``pytest.mark.parametrize``."""
    reg = registry or get_registry()
    variants = _variants(reg, backend, ops)
    if not variants:
        loaded = sorted({k.backend for ks in reg.kernels.values() for k in ks})
        raise ValueError(f"conformance: no kernel of backend {backend!r} is loaded; loaded backends: {loaded}; "
                         f"failed plugins: {[p.name + ': ' + p.error for p in reg.failed()]}")
    cases = []
    for v in variants:
        spec = get_spec(v.kernel.op)
        for name in [*spec.cases, *spec.edge_cases]:
            cases.append(ConformanceCase(op=v.kernel.op, variant=v.name, case=name, device=device))
    return cases


def run_case(case: ConformanceCase, *, seed: int | None = None, registry: Registry | None = None) -> CaseResult:
    """Check one case with fresh random inputs; never raises for the kernel's fault."""
    reg = registry or get_registry()
    spec = get_spec(case.op)
    variant = next((v for k in reg.kernels_for(case.op) for v in k.variants() if v.name == case.variant), None)
    if variant is None:
        return CaseResult(case=case, status="failed", reason=f"kernel {case.variant!r} is not loaded")
    reference = reg.reference(case.op)
    if reference is None:
        return CaseResult(case=case, status="failed", reason="no reference kernel is loaded for this op")
    factory = spec.cases.get(case.case) or spec.edge_cases[case.case]
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    sample = factory(gen, case.device)
    args, attrs = spec.prepare(sample.args, sample.attrs)
    sample = type(sample)(args=args, attrs=attrs, name=case.case)
    reasons = variant.kernel.reasons_for(spec, args, attrs)
    if reasons:
        return CaseResult(case=case, status="unsupported", reason="; ".join(reasons))
    needs_grad = bool(spec.grad_inputs) and variant.kernel.differentiable and reference.backward is not None
    try:
        exp = expected(spec, reference, sample, needs_grad, gen)
    except Exception as e:
        return CaseResult(case=case, status="failed", reason=f"the reference raised {type(e).__name__}: {e}")
    for which, fn in serving_calls(variant).items():  # fn, and what its bind returns
        verdict, status = check_status(spec, fn, exp)
        if status == "ok" and variant.kernel.checks_data:
            claim = check_data_claim(spec, fn, args, attrs, gen)
            if not claim.ok:
                verdict, status = claim, "wrong"
        if status != "ok":
            verdict = replace(verdict, reason=which + verdict.reason)
            break
    return CaseResult(case=case, status=status, max_error=verdict.max_error,
                      reason=f"{verdict.reason} (seed {seed})" if status != "ok" else "")


def check_case(case: ConformanceCase, *, seed: int | None = None, skip_unsupported: bool = True) -> CaseResult:
    """``run_case``, raising ``ValidationError`` on a wrong or failed result.

    A case the kernel declares unsupported is reported through ``pytest.skip`` with the kernel's
    reasons (when pytest is running), so it shows as a skip with a reason, never as a pass.
    """
    result = run_case(case, seed=seed)
    if result.status in ("wrong", "failed"):
        raise ValidationError(f"{case}: {result.status}: {result.reason}")
    if result.status == "unsupported" and skip_unsupported:
        import sys

        if "pytest" in sys.modules:
            import pytest

            pytest.skip(f"{case.variant} declares {case.case} unsupported: {result.reason}")
    return result


def check_backend(backend: str, *, ops: Iterable[str] | None = None, device: str = "cpu",
                  registry: Registry | None = None) -> Report:
    """Run every case of every kernel of ``backend``; the report lists each result."""
    reg = registry or get_registry()
    results = tuple(run_case(c, registry=reg) for c in conformance_cases(backend, ops=ops, device=device, registry=reg))
    return Report(backend=backend, results=results)


def assert_conforms(backend: str, **kwargs: Any) -> Report:
    """``check_backend``, raising ``ValidationError`` with the table when anything failed or nothing ran."""
    report = check_backend(backend, **kwargs)
    if not report.ok:
        raise ValidationError(f"backend {backend!r} does not conform:\n{report}")
    return report
