"""``python -m core.autotune``: validate and time every kernel of every op on its default cases.

One table per op (one row per case and kernel), the winners stored in the tuning cache, and the
cache's path printed at the end. Collective ops (all_reduce) run in a local gloo group of
``--world-size`` processes on the loopback address, or, under ``torchrun``, in the launcher's group
(only rank 0 prints).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import torch

from core import tuning
from core.cache import FILE_NAME, cache_dir
from core.errors import InvalidInput
from core.ops import all_specs
from core.spec import OpSpec, Sample
from registry import loader

DEFAULT_BUDGET = 0.25


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.autotune", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", help="comma-separated ops to tune (default: all)")
    p.add_argument("--backends", help="comma-separated backends (or variants) to consider (default: all)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to tune on (default: cpu)")
    p.add_argument("--cases", help="comma-separated case names (default: every op's default cases)")
    p.add_argument("--json", metavar="PATH", help="also write every row as a JSON list of objects")
    p.add_argument("--list", action="store_true", help="list plugins and kernels, then exit")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the tuning cache")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, metavar="SECONDS",
                   help=f"timing budget per candidate and case (default: {DEFAULT_BUDGET})")
    p.add_argument("--world-size", type=int, default=2, help="processes in the local group for collective ops (default: 2)")
    p.add_argument("--seed", type=int, default=None, help="seed for the cases' random inputs")
    p.add_argument("--build", action="store_true", help="compile the fused C++ kernels ahead of time, then exit")
    p.add_argument("--replay", metavar="PATH", help="tune exactly the dispatch keys recorded in PATH "
                   "(SWITCHYARD_RECORD=PATH while a program runs), instead of the default cases")
    return p


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


class _Progress:
    """One line on stderr, rewritten in place on a terminal; elsewhere (a log, a pipe) a plain line
    as each case starts, since carriage returns would run every step into one line."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr is not None
        self.tty = self.enabled and sys.stderr.isatty()
        self.width = 0

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"[autotune] {text}"[:110]
        if not self.tty:
            if text.endswith("preparing inputs"):
                sys.stderr.write(line.removesuffix(": preparing inputs") + "\n")
                sys.stderr.flush()
            return
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()
        self.width = len(line)

    def done(self) -> None:
        if self.tty and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


def tune_op(spec: OpSpec, tuner: tuning.Tuner, *, device: str, cases: Sequence[str] | None, backends: Sequence[str] | None,
            budget: float, write_cache: bool, seed: int, progress: _Progress) -> list[dict[str, Any]]:
    """Tune every selected case of one op; the rows of its table."""
    rows: list[dict[str, Any]] = []
    for i, (case, factory) in enumerate(spec.cases.items()):
        if cases is not None and case not in cases:
            continue
        progress(f"{spec.name} / {case}: preparing inputs")
        sample = factory(torch.Generator().manual_seed(seed * 1009 + i), device)
        args, attrs = spec.prepare(sample.args, sample.attrs)
        key = spec.key(args, attrs)
        decision = tuner.decide(
            spec, key, args, attrs, mode="lazy", budget=budget, backends=backends, time_reference=True,
            timing_sample=Sample(args=args, attrs=attrs), use_cache=False, store=write_cache,
            progress=lambda text, c=case: progress(f"{spec.name} / {c}: {text}"))
        rows += _rows(spec, case, key, decision)
    return rows


def _rows(spec: OpSpec, case: str, key: tuple[Any, ...], decision: tuning.Decision) -> list[dict[str, Any]]:
    """The table's rows for one decision; the chosen row carries the decision's confidence."""
    times = {r.backend: r.median_ms for r in decision.rows}
    return [{
        "op": spec.name, "case": case, "backend": r.backend, "status": r.status, "priority": r.priority,
        "median_ms": r.median_ms, "spread_ms": r.spread_ms,
        "vs_reference": _ratio(times.get("reference"), r.median_ms),
        "vs_torch": _ratio(times.get("torch"), r.median_ms),
        "confidence": decision.confidence if r.status == "chosen" else None,
        "final": decision.final if r.status == "chosen" else None,
        "max_error": None if r.max_error is None or math.isnan(r.max_error) else r.max_error,
        "reason": r.reason, "key": [_json_scalar(part) for part in key],
    } for r in decision.rows]


def replay(path: str, tuner: tuning.Tuner, *, budget: float, write_cache: bool, seed: int,
           progress: _Progress) -> list[dict[str, Any]]:
    """Tune every (op, key) recorded in ``path`` on fresh inputs of its recorded description; a key
    already decided in the cache is taken from there."""
    from core import record

    specs = all_specs()
    rows: list[dict[str, Any]] = []
    for n, line in record.lines(path):
        spec = specs.get(line["op"])
        if spec is None:
            raise InvalidInput(f"--replay: {path} line {n}: unknown op {line['op']!r}; known: {sorted(specs)}")
        gen = torch.Generator().manual_seed(seed * 1009 + n)
        args, attrs, needs_grad = record.inputs(spec, line, gen)
        key = spec.key(args, attrs) + (("grad",) if needs_grad and spec.grad_inputs else ())
        recorded = tuple(line["key"])
        if [_json_scalar(k) for k in key] != list(recorded):
            raise InvalidInput(f"--replay: {path} line {n}: the rebuilt inputs have dispatch key {key}, expected the "
                               f"recorded {recorded}")
        case = f"line {n}"
        progress(f"{spec.name} / {case}: preparing inputs")
        for attempt in range(3):  # a decision measured under contention is not final: measure again, longer
            decision = tuner.decide(spec, key, args, attrs, needs_grad=needs_grad, mode="lazy", budget=budget * 2 ** attempt,
                                    use_cache=write_cache, store=write_cache,
                                    progress=lambda text, c=case, s=spec.name: progress(f"{s} / {c}: {text}"))
            if decision.final:
                break
        rows += _rows(spec, case, key, decision)
    return rows


def _json_scalar(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _ratio(base: float | None, mine: float | None) -> float | None:
    if base is None or mine is None or mine <= 0:
        return None
    return base / mine


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def table(rows: Sequence[dict[str, Any]]) -> str:
    from tabulate import tabulate

    body = [[r["case"], r["backend"], r["status"], _fmt(r["median_ms"], ".4g"), _fmt(r["spread_ms"], ".2g"),
             _fmt(r["vs_reference"], ".3g") + ("x" if r["vs_reference"] else ""),
             _fmt(r["vs_torch"], ".3g") + ("x" if r["vs_torch"] else ""),
             _fmt(r.get("confidence"), ".2f") + (" (not final)" if r.get("final") is False else ""),
             _fmt(r["max_error"], ".3g"), _clip(r["reason"])] for r in rows]
    headers = ["case", "backend", "status", "median ms", "spread ms", "vs reference", "vs torch", "confidence",
               "max error", "reason"]
    return tabulate(body, headers=headers)


def _clip(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def list_plugins() -> str:
    from tabulate import tabulate

    reg = loader.get_registry()
    plugins = [[p.name, p.source, p.version, p.status, _clip(p.error, 100)] for p in reg.plugins]
    kernels = []
    for op, ks in reg.kernels.items():
        for k in ks:
            dtypes = "any" if k.dtypes is None else ",".join(sorted(str(d).removeprefix("torch.") for d in k.dtypes))
            configs = "; ".join(",".join(f"{a}={b}" for a, b in c.items()) for c in k.configs)
            kernels.append([op, k.backend, k.plugin, ",".join(sorted(k.devices)), dtypes, k.priority,
                            "yes" if k.differentiable else "no", configs])
    return "\n\n".join([
        "Plugins:",
        tabulate(plugins, headers=["plugin", "source", "version", "status", "error"]),
        "Kernels:",
        tabulate(kernels, headers=["op", "backend", "plugin", "devices", "dtypes", "priority", "differentiable", "configs"]),
    ])


def _run_ops(names: Sequence[str], options: dict[str, Any], progress: _Progress) -> list[dict[str, Any]]:
    specs = all_specs()
    tuner = tuning.new_tuner(use_cache=not options["no_cache"])
    rows: list[dict[str, Any]] = []
    for name in names:
        rows += tune_op(specs[name], tuner, device=options["device"], cases=options["cases"], backends=options["backends"],
                        budget=options["budget"], write_cache=not options["no_cache"], seed=options["seed"], progress=progress)
    return rows


def _collective_worker(rank: int, world_size: int, names: Sequence[str], options: dict[str, Any]) -> list[dict[str, Any]]:
    """One rank of the local group: tune the collective ops in lockstep; rank 0's rows are printed."""
    return _run_ops(names, options, _Progress(rank == 0 and options["progress"]))


def _collective_rows(names: Sequence[str], options: dict[str, Any], progress: _Progress) -> list[dict[str, Any]]:
    import core.distributed as distributed

    if distributed.init_from_env():  # under torchrun: this process is one rank of the launcher's group
        return _run_ops(names, options, progress)
    if options["world_size"] <= 1:
        return _run_ops(names, options, progress)
    progress(f"starting a local gloo group of {options['world_size']} processes")
    results = distributed.run_local_group(options["world_size"], _collective_worker, list(names), options)
    return results[0]


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        print(list_plugins())
        return 0
    specs = all_specs()
    ops = _split(args.ops) or list(specs)
    unknown = [o for o in ops if o not in specs]
    if unknown:
        raise SystemExit(f"--ops: unknown op(s) {unknown}; known: {list(specs)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    cases = _split(args.cases)
    if cases is not None:
        known = {c for o in ops for c in specs[o].cases}
        missing = [c for c in cases if c not in known]
        if missing:
            raise SystemExit(f"--cases: unknown case(s) {missing}; the selected ops' cases are {sorted(known)}")
    if args.budget <= 0:
        raise SystemExit(f"--budget: expected a positive number of seconds, got {args.budget}")
    options = {"device": args.device, "cases": cases, "backends": _split(args.backends), "budget": args.budget,
               "no_cache": args.no_cache, "seed": args.seed if args.seed is not None else int(time.time()) % 100000,
               "world_size": args.world_size, "progress": True}
    rank0 = _is_rank0()
    progress = _Progress(rank0)
    started = time.perf_counter()
    if args.build or (args.device == "cpu" and (options["backends"] is None or "fused" in options["backends"])):
        from core import hotpath
        from plugins.fused import _build

        hot = hotpath.start_build()  # the dispatcher's C++ memo keys, beside the kernels' compilers
        missing = [op for op in ops if (_build.CSRC / f"{op}.cpp").exists() and not _build.is_built(op)]
        failed_builds = {}
        if missing:
            progress(f"compiling the fused C++ kernels of {', '.join(missing)} (first run only)")
            failed_builds = {op: why for op, why in _build.prebuild(missing).items() if why}
        if hot is not None:
            hot.join()
            if hotpath.unavailable_reason():
                failed_builds["hotpath"] = hotpath.unavailable_reason()
        if args.build and failed_builds:
            print(f"build failed: {failed_builds}", file=sys.stderr)
            return 1
        if args.build:
            progress.done()
            print(f"fused C++ kernels built in {time.perf_counter() - started:.1f} s "
                  f"({len(missing)} compiled, the rest already built)"
                  + ("; the dispatcher's C++ memo keys too" if hot is not None else ""))
            return 0
    if args.replay:
        return _main_replay(args, options, progress, started)
    all_rows: list[dict[str, Any]] = []
    for name in ops:
        spec = specs[name]
        try:
            rows = _collective_rows([name], options, progress) if spec.collective else _run_ops([name], options, progress)
        except InvalidInput as e:
            progress.done()
            print(f"{name}: {e}", file=sys.stderr)
            return 2
        progress.done()
        all_rows += rows
        if rank0:
            print(f"\n== {name}: {spec.summary} ==")
            print(table(rows) if rows else "(no case selected)")
            sys.stdout.flush()
    if not rank0:
        return 0
    failed = loader.get_registry().failed()
    for p in failed:
        print(f"\nplugin {p.name!r} failed to load: {p.error}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(all_rows, f, indent=1)
        print(f"\nrows written to {args.json}")
    elapsed = time.perf_counter() - started
    if args.no_cache:
        print(f"\ntuned in {elapsed:.1f} s; the tuning cache was not used (--no-cache)")
    else:
        print(f"\ntuned in {elapsed:.1f} s; winners stored in the tuning cache: {cache_dir() / FILE_NAME}")
    return 0


def _main_replay(args: argparse.Namespace, options: dict[str, Any], progress: _Progress, started: float) -> int:
    try:
        rows = replay(args.replay, tuning.new_tuner(use_cache=not args.no_cache), budget=args.budget,
                      write_cache=not args.no_cache, seed=options["seed"], progress=progress)
    except (InvalidInput, OSError) as e:
        progress.done()
        print(f"--replay: {e}" if isinstance(e, OSError) else str(e), file=sys.stderr)
        return 2
    progress.done()
    print(f"\n== replayed {args.replay} ==")
    print(table(rows) if rows else "(no key recorded)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    print(f"\nreplayed in {time.perf_counter() - started:.1f} s"
          + ("" if args.no_cache else f"; winners stored in the tuning cache: {cache_dir() / FILE_NAME}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
