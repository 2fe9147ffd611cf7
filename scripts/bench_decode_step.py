"""decode_step latency per step on the CPU: every kernel beside a straightforward torch peer, one run.

Sizes (the issue's): B in {1, 8, 64}; a Medusa tree of T = 64 nodes and a chain of 5 drafts; V in
{32,000, 151,936}; float32 logits; rules greedy and typical (temperature 0.7) on both trees, rejection on
the chain. The peer ("naive") materializes the softmax the way Medusa's reference code does
(``softmax(logits / T)``, then the entropy from it and ``log_softmax``), in chunks of batch rows so its
temporaries stay near 1 GB, and then shares the torch kernel's tree walk. Each figure is the best of a
few calls after one warm-up call (on a shared machine the best is the least disturbed; ``--median``
prints medians instead); the reference (float64 numpy) only runs on the smaller inputs. Target: fused
at least 2x the torch kernel at V = 151,936.

    python scripts/bench_decode_step.py [--quick] [--reps N] [--median] [--threads N]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from typing import Any, Callable

import torch
from tabulate import tabulate

from core.ops.decode_step import SPEC, chain, make_inputs, medusa_tree
from plugins.fused.decode_step import decode_step as fused
from plugins.reference.decode_step import decode_step as reference
from plugins.torch_backend.decode_step import RowStats, finish
from plugins.torch_backend.decode_step import decode_step as torch_kernel

PEER_CHUNK_BYTES = 1 << 30
REFERENCE_MAX_ELEMENTS = 20_000_000


def naive(draft_tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor, **attrs: Any) -> Any:
    """The straightforward peer: the softmax of every row materialized, statistics read off it."""
    B, T, V = target_logits.shape
    temperature = attrs["temperature"]
    step = max(1, PEER_CHUNK_BYTES // (T * V * 4))
    parts = []
    for b in range(0, B, step):
        x = target_logits[b:b + step].float()
        top, amax = x.max(-1)
        if temperature == 0:
            parts.append((amax, top, None, None))
            continue
        probs = torch.softmax(x / temperature, -1)
        log_probs = torch.log_softmax(x / temperature, -1)
        entropy = -(probs * log_probs).sum(-1)
        log_sum = torch.logsumexp(x / temperature, -1) - top / temperature
        parts.append((amax, top, log_sum, entropy))
    cat = lambda i: None if parts[0][i] is None else torch.cat([p[i] for p in parts])  # noqa: E731
    stats = RowStats(cat(0), cat(1), cat(2), cat(3))
    return finish(draft_tokens, parents, target_logits, stats, **attrs)


def timed_ms(fn: Callable[[], Any], reps: int, budget_s: float, median: bool) -> float:
    """Best (or median) of up to ``reps`` timed calls after one warm-up call, stopping early past ``budget_s``."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times: list[float] = []
    spent = 0.0
    for _ in range(reps):
        if times and spent + first > budget_s:
            break
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        spent += times[-1] / 1e3
    return statistics.median(times) if median else min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B in {1, 8} only (skips the 2.5 GB inputs)")
    parser.add_argument("--reps", type=int, default=7, help="timed calls per figure (default 7)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed calls per figure at most")
    parser.add_argument("--median", action="store_true", help="report medians rather than the best call")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's (and so the fused kernel's) thread count; 1 is the steadiest on a busy machine")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    gen = torch.Generator().manual_seed(0)
    batches = (1, 8) if options.quick else (1, 8, 64)
    trees = {"medusa-64": medusa_tree(64), "chain-5": chain(5)}
    rows = []
    what = "median" if options.median else "best"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {what} of up to {options.reps} calls, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    for V in (32000, 151936):
        for tree_name, parents in trees.items():
            for B in batches:
                rules = ("greedy", "typical", "rejection") if tree_name.startswith("chain") else ("greedy", "typical")
                for rule in rules:
                    temperature = 0.7 if rule == "typical" else 1.0
                    sample = make_inputs(gen, "cpu", B=B, parents=parents, V=V, rule=rule, temperature=temperature)
                    args, attrs = SPEC.prepare(sample.args, sample.attrs)
                    kernels: dict[str, Callable[..., Any]] = {"naive": naive, "torch": torch_kernel, "fused": fused}
                    if B * len(parents) * V <= REFERENCE_MAX_ELEMENTS:
                        kernels = {"reference": reference, **kernels}
                    ms = {name: timed_ms(lambda k=k: k(*args, **attrs), options.reps, options.budget, options.median)
                          for name, k in kernels.items()}
                    row = [rule, tree_name, B, V] + [f"{ms[k]:.2f}" if k in ms else "-"
                                                     for k in ("reference", "naive", "torch", "fused")]
                    row += [f"{ms['torch'] / ms['fused']:.1f}x", f"{ms['naive'] / ms['fused']:.1f}x"]
                    rows.append(row)
                    print(tabulate([row], tablefmt="plain"), flush=True)
                    del sample, args, attrs
                    gc.collect()
    print()
    print(tabulate(rows, headers=["rule", "tree", "B", "V", "reference ms", "naive ms", "torch ms", "fused ms",
                                  "fused vs torch", "fused vs naive"]))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
