"""The tuner's cost and quality on new keys, against exhaustive interleaved timing.

For each key (every default case of attention, nearest_neighbor, precision_cast and split_finding,
plus held-out shapes of this script's own), as a new user meets it (kernels compiled, no tuning
cache): the lazy miss path's wall time (``Tuner.decide`` at the dispatcher's default budget) split
into validation and timing, repeated in ``--runs`` independent tuners; then every candidate the lazy
path may choose (validated, not the reference) timed exhaustively, interleaved in shuffled rounds for
``--exhaustive`` seconds, as the truth the decisions are scored against:

- regret: the chosen kernel's exhaustive time (lower quartile) over the best one's;
- flips: keys whose runs chose different kernels, harmful when the chosen ones differ by more than
  epsilon (3%) in the exhaustive timing;
- calibration: of the decisions stated at confidence >= 0.95, how many are within epsilon of the best
  (only where the tuner states a confidence);
- prediction (where the tuner predicts from neighbour keys): top-1 agreement with the exhaustive best
  and the regret of the predicted kernel, each key predicted from the other keys' decisions only.

Runs against whichever checkout it sits in (``python scripts/bench_tuner.py``), so the same file
copied into a clone at an older commit measures the old tuner.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core import tuning  # noqa: E402
from core.ops import all_specs  # noqa: E402
from core.ops import attention as _att, nearest_neighbor as _nn, precision_cast as _pc, split_finding as _sf  # noqa: E402
from core.spec import Sample  # noqa: E402
from registry.loader import get_registry  # noqa: E402

EPS = 0.03
OPS = ("attention", "nearest_neighbor", "precision_cast", "split_finding")
HELD_OUT = {
    "attention": {
        "b1-h8-l512-d64-causal": _att._case(1, 8, 8, 512, 512, 64, causal=True),
        "b2-h4-l64-d32": _att._case(2, 4, 4, 64, 64, 32),
        "gqa-h16-kv4-l256-d128-causal": _att._case(1, 16, 4, 256, 256, 128, causal=True),
        "decode-lq1-lk1024-d64": _att._case(2, 8, 8, 1, 1024, 64),
    },
    "nearest_neighbor": {
        "d4-n16384-m1024-k10": _nn._case(1024, 16384, 4, 10),
        "d8-n16384-m512-k10": _nn._case(512, 16384, 8, 10),
        "d64-n4096-m128-k5": _nn._case(128, 4096, 64, 5),
        "d16-n20000-m256-k8-ip": _nn._case(256, 20000, 16, 8, metric="ip"),
    },
    "precision_cast": {
        "f32-to-bf16-n65536": _pc._case((1 << 16,), torch.float32, torch.bfloat16),
        "f32-to-e4m3fn-amax-n1m": _pc._case((1 << 20,), torch.float32, torch.float8_e4m3fn, scaling="amax"),
        "f16-to-e5m2-n131072": _pc._case((1 << 17,), torch.float16, torch.float8_e5m2),
    },
    "split_finding": {
        "n32768-f16-nodes8": _sf._case(32768, 16, 8),
        "n131072-f8-root": _sf._case(131072, 8, 1),
        "n8192-f32-nodes32": _sf._case(8192, 32, 32),
    },
}


def _keys(ops: list[str], held_out_only: bool) -> list[tuple[str, str, bool, Any]]:
    specs = all_specs()
    out = []
    for op in ops:
        if not held_out_only:
            out += [(op, case, False, f) for case, f in specs[op].cases.items()]
        out += [(op, case, True, f) for case, f in HELD_OUT[op].items()]
    return out


def _lazy(spec: Any, key: Any, args: Any, attrs: Any, seed: int) -> dict[str, Any]:
    """One decision on the lazy path in a fresh tuner without a cache: wall time, split by phase."""
    tuner = tuning.Tuner(get_registry(), None, seed=seed)
    marks: list[tuple[float, str]] = []
    start = time.perf_counter()
    d = tuner.decide(spec, key, args, attrs, mode="lazy", budget=tuning.DEFAULT_LAZY_BUDGET, use_cache=False,
                     store=False, progress=lambda s: marks.append((time.perf_counter(), s)))
    end = time.perf_counter()
    marks.append((end, "end"))
    validating = sum(b[0] - a[0] for a, b in zip(marks, marks[1:]) if a[1].startswith("validating"))
    return {"ms": (end - start) * 1e3, "validation_ms": validating * 1e3, "winner": d.winner,
            "confidence": getattr(d, "confidence", None), "decision": d}


def _exhaustive(spec: Any, args: Any, attrs: Any, names: list[str], seconds: float) -> dict[str, float]:
    """Each candidate's lower-quartile time (ms) over interleaved rounds, each in a fresh seeded order (a
    rotation would keep each candidate's predecessor fixed, and with it the after-effects it leaves)."""
    tuner = tuning.Tuner(get_registry(), None, seed=1)
    sample = spec.synthesize(args, attrs, torch.Generator().manual_seed(12345))
    fns = {n: tuner.variant(spec.name, n).fn for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for n in names:
            fns[n](*sample.args, **sample.attrs)
        start, r = time.perf_counter(), 0
        shuffle = random.Random(r).shuffle
        while r < 5 or (time.perf_counter() - start < seconds and r < 400):
            order = list(names)
            shuffle(order)
            for n in order:
                t0 = time.perf_counter()
                fns[n](*sample.args, **sample.attrs)
                times[n].append((time.perf_counter() - t0) * 1e3)
            r += 1
    # the lower quartile: load from elsewhere only adds time, and on a shared machine it can slow
    # half the runs of a kernel by 20x
    return {n: statistics.quantiles(v, n=4)[0] for n, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--exhaustive", type=float, default=2.0, help="seconds of interleaved timing per key")
    p.add_argument("--held-out-only", action="store_true")
    p.add_argument("--json", help="write every key's figures here")
    opts = p.parse_args()
    specs = all_specs()
    ops = [o.strip() for o in opts.ops.split(",") if o.strip()]
    from plugins.fused import _build

    _build.prebuild([o for o in ops if (_build.CSRC / f"{o}.cpp").exists()])
    results = []
    warmed: set[str] = set()
    for op, case, held, factory in _keys(ops, opts.held_out_only):
        spec = specs[op]
        sample = factory(torch.Generator().manual_seed(7), "cpu")
        args, attrs = spec.prepare(sample.args, sample.attrs)
        key = spec.key(args, attrs)
        if op not in warmed:  # the op's libraries loaded, as for a user whose kernels are compiled
            _lazy(spec, key, args, attrs, seed=999)
            warmed.add(op)
        runs = [_lazy(spec, key, args, attrs, seed=100 + i) for i in range(opts.runs)]
        d = runs[0]["decision"]
        names = [r.backend for r in d.rows if r.status in ("ok", "chosen") and r.backend != "reference"]
        names = names or [r.backend for r in d.rows if r.status in ("ok", "chosen")]
        truth = _exhaustive(spec, args, attrs, names, opts.exhaustive) if names else {}
        best = min(truth.values()) if truth else None

        def regret(name: str | None) -> float | None:
            return truth[name] / best if best and name in truth else None

        winners = [r["winner"] for r in runs]
        regrets = [regret(w) for w in winners]
        chosen_t = [truth[w] for w in winners if w in truth]
        row = {"op": op, "case": case, "held_out": held, "key": [str(k) for k in key],
               "ms": [r["ms"] for r in runs], "validation_ms": [r["validation_ms"] for r in runs],
               "winners": winners, "confidence": [r["confidence"] for r in runs], "regret": regrets,
               "truth": truth, "flipped": len(set(winners)) > 1,
               "harmful_flip": bool(chosen_t) and max(chosen_t) / min(chosen_t) > 1 + EPS}
        results.append(row)
        conf = [c for c in row["confidence"] if c is not None]
        print(f"{op:17s} {case:30s} {'held' if held else 'dflt'}  new key {statistics.median(row['ms']):7.1f} ms "
              f"(validation {statistics.median(row['validation_ms']):6.1f})  regret max "
              f"{max((r for r in regrets if r), default=float('nan')):.3f}  winners {sorted(set(map(str, winners)))}"
              + (f"  conf min {min(conf):.2f}" if conf else ""), flush=True)
    _predictions(results, specs)
    _summary(results)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


def _predictions(results: list[dict[str, Any]], specs: Any) -> None:
    """Leave-one-out: each key predicted from the other keys' first-run decisions, where the tuner can."""
    try:
        from core import racing
        predict = racing.predict
    except (ImportError, AttributeError):
        return
    for row in results:
        others = [(r["op"], tuple(r["key"]), r["winners"][0], r["truth"]) for r in results if r is not row]
        spec = specs[row["op"]]
        known = {k: {"winner": w, "rows": [{"backend": b, "median_ms": t} for b, t in truth.items()]}
                 for op, k, w, truth in others if op == row["op"]}
        pred = predict(spec, tuple(row["key"]), known)
        row["predicted"] = pred.winner if pred is not None else None
        row["predicted_regret"] = (row["truth"][pred.winner] / min(row["truth"].values())
                                   if pred is not None and pred.winner in row["truth"] else None)


def _summary(results: list[dict[str, Any]]) -> None:
    print("\n== summary (load: " + os.popen("uptime").read().strip().split("load average:")[-1].strip() + ") ==")
    for label, rows in (("default cases", [r for r in results if not r["held_out"]]),
                        ("held-out", [r for r in results if r["held_out"]]), ("all", results)):
        if not rows:
            continue
        ms = [statistics.median(r["ms"]) for r in rows]
        val = [statistics.median(r["validation_ms"]) for r in rows]
        regrets = [g for r in rows for g in r["regret"] if g is not None]
        stated = [(c, g) for r in rows for c, g in zip(r["confidence"], r["regret"]) if c is not None and g is not None]
        high = [g for c, g in stated if c >= 0.95]
        line = (f"{label:14s} keys {len(rows):2d}: new-key median {statistics.median(ms):6.1f} ms (mean {statistics.mean(ms):6.1f};"
                f" validation median {statistics.median(val):5.1f} ms)  regret median {statistics.median(regrets):.3f}"
                f" max {max(regrets):.3f}  keys with a flip {sum(r['flipped'] for r in rows)}, harmful"
                f" {sum(r['harmful_flip'] for r in rows)}")
        if stated:
            line += (f"  stated >=0.95: {len(high)}/{len(stated)}, of which within {EPS:.0%}: "
                     f"{sum(g <= 1 + EPS for g in high)}")
        print(line)
        preds = [r for r in rows if r.get("predicted") is not None]
        if "predicted" in rows[0]:
            agree = sum(r["predicted_regret"] is not None and r["predicted_regret"] <= 1 + EPS for r in preds)
            exact = sum(r["predicted"] == min(r["truth"], key=r["truth"].get) for r in preds)
            pr = [r["predicted_regret"] for r in preds if r["predicted_regret"] is not None]
            print(f"{'':14s} prediction from neighbours: {len(preds)}/{len(rows)} keys predicted, top-1 exact {exact},"
                  f" within {EPS:.0%} {agree}, regret max {max(pr) if pr else float('nan'):.3f}")


if __name__ == "__main__":
    sys.exit(main())
