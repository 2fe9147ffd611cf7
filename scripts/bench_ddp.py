"""DDP time per training step: DDP's default reduction against Switchyard's communication hooks (and
torch's own Python hooks, allreduce_hook and fp16_compress_hook, as the hooks' peers), on a local gloo
group, steps alternated.

Every hook gets its own DDP replica of the same model; each round times one step of each (forward,
backward with the bucketed all-reduces, SGD step), after a barrier so no rank starts early. Medians
over the rounds, the slowest rank's; ratios against the default hook; and the minor page faults a
step (fresh pages from the OS, such as new large output tensors), the most on any rank.

    python scripts/bench_ddp.py [--world 2] [--rounds 20] [--width 1024] [--layers 4] [--bucket-mb 25]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

HOOKS = ("default", "allreduce_hook", "torch allreduce_hook", "bf16_compress_hook", "fp16_compress_hook",
         "torch fp16_compress_hook")


def _hook(name: str) -> Any:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from core.integrations import ddp

    return {"allreduce_hook": ddp.allreduce_hook, "bf16_compress_hook": ddp.bf16_compress_hook,
            "fp16_compress_hook": ddp.fp16_compress_hook,
            "torch allreduce_hook": default_hooks.allreduce_hook,
            "torch fp16_compress_hook": default_hooks.fp16_compress_hook}.get(name)


def _rank(rank: int, world: int, width: int, layers: int, bucket_mb: float, rounds: int, batch: int) -> dict[str, list[float]]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        mods: list[torch.nn.Module] = []
        for _ in range(layers):
            mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
        return torch.nn.Sequential(*mods)

    replicas = {}
    for name in HOOKS:
        m = DDP(model(), bucket_cap_mb=bucket_mb)
        hook = _hook(name)
        if hook is not None:
            m.register_comm_hook(None, hook)
        replicas[name] = (m, torch.optim.SGD(m.parameters(), lr=1e-3))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, width, generator=gen)

    faults: dict[str, list[int]] = {name: [] for name in HOOKS}

    def step(name: str) -> float:
        m, opt = replicas[name]
        dist.barrier()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
        took = time.perf_counter() - start
        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return took

    for name in HOOKS:  # warm-up: DDP rebuilds its buckets after step 1; the dispatcher tunes each key
        step(name)
        step(name)
    times: dict[str, list[float]] = {name: [] for name in HOOKS}
    for name in HOOKS:
        faults[name].clear()
    for r in range(rounds):
        # Each round in another order (rotated, every other one reversed; the same on every rank), so
        # no hook is always timed right after the same one and carries what that one leaves behind.
        order = HOOKS[r % len(HOOKS):] + HOOKS[:r % len(HOOKS)]
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name].append(step(name))
    return {"times": times, "faults": faults}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    args = ap.parse_args()

    from core import distributed

    results = distributed.run_local_group(args.world, _rank, args.width, args.layers, args.bucket_mb, args.rounds,
                                          args.batch, timeout=1800)
    params = args.layers * (args.width * args.width + args.width)
    print(f"world {args.world} (gloo, loopback, 1 thread a rank), {params / 1e6:.1f} M float32 parameters "
          f"({params * 4 / 2**20:.0f} MiB of gradients), buckets of {args.bucket_mb:g} MB, batch {args.batch}, "
          f"{args.rounds} rounds; load {os.getloadavg()[0]:.2f}")
    medians = {name: max(statistics.median(r["times"][name]) for r in results) for name in HOOKS}
    faults = {name: max(statistics.median(r["faults"][name]) for r in results) for name in HOOKS}
    base = medians["default"]
    print(f"{'hook':28s} {'ms/step':>9s} {'vs default':>11s} {'page faults/step':>17s}")
    for name in HOOKS:
        print(f"{name:28s} {medians[name] * 1e3:9.2f} {base / medians[name]:10.2f}x {faults[name]:17.0f}")


if __name__ == "__main__":
    main()
