"""One prepared check for a machine with a GPU: every Triton kernel of the project, on the real device.

Each ``plugins/fused/triton/<op>.py`` provides ``gpu_check(device) -> list[dict]``: it checks its
kernels at full size against the reference math and times them. This script runs them all (then the
dispatcher once per op on CUDA, so the autotuner's choice is shown too) and prints one table. It must
finish in under 5 minutes; run it as

    python scripts/gpu_check.py            # exits 1 if any check failed
"""
from __future__ import annotations

import importlib
import sys
import time
import traceback

import torch
from tabulate import tabulate

from core.ops import OP_NAMES


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check")
        return 2
    device = "cuda"
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    rows, failed = [], 0
    started = time.perf_counter()
    for op in OP_NAMES:
        try:
            module = importlib.import_module(f"plugins.fused.triton.{op}")
        except ModuleNotFoundError:
            continue
        check = getattr(module, "gpu_check", None)
        if check is None:
            continue
        t0 = time.perf_counter()
        try:
            results = check(device)
        except Exception:
            failed += 1
            rows.append([op, "(gpu_check)", "", "FAILED", "", "", traceback.format_exc(limit=3).strip().splitlines()[-1]])
            continue
        for r in results:
            ok = bool(r.get("ok"))
            failed += 0 if ok else 1
            rows.append([op, r.get("kernel", ""), r.get("case", ""), "ok" if ok else "WRONG",
                         f"{r['max_error']:.3g}" if r.get("max_error") is not None else "",
                         f"{r['ms']:.4g}" if r.get("ms") is not None else "", r.get("note", "")])
        print(f"{op}: {len(results)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    print(tabulate(rows, headers=["op", "kernel", "case", "check", "max error", "ms", "note"]))
    print(f"\n{failed} failed; total {time.perf_counter() - started:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
