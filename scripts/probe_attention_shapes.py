"""Attention on random shapes the sweep does not hold, as a user calls it, against SDPA with the same mask.

Each shape draws B, kv heads, the GQA ratio, D, Lq, Lk (Lq or a random length up to 3000), the dtype
(float32, bfloat16, float16), causal or not and a bool mask or none; the dispatched call (warm key) and
SDPA (``enable_gqa``, the bottom-right causal mask spelled out where Lq != Lk) are timed paired, as
``bench_peer_parity.py`` does, and checked against each other. Prints PASS or MISS per shape (target: at
most 1.10x SDPA's time or 5 us more) and the misses last.

    python scripts/probe_attention_shapes.py [--seed N] [--shapes 40] [--budget 0.3]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_peer_parity import RATIO, SLACK_US, cpu_model, paired  # noqa: E402
from core import dispatcher  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--shapes", type=int, default=40)
    p.add_argument("--budget", type=float, default=0.3, help="timing seconds per shape")
    a = p.parse_args()
    rng = random.Random(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; seed {a.seed}", flush=True)
    misses = []
    for _ in range(a.shapes):
        B, Hkv, group = rng.choice([1, 1, 2, 3, 4]), rng.choice([1, 2, 4, 8]), rng.choice([1, 1, 2, 4, 8])
        Hq, D = Hkv * group, rng.choice([32, 48, 64, 80, 96, 112, 128, 256])
        Lq = rng.choice([1, 1, 2, 3, 5, 7, 16, 33, 100, 257])
        Lk = rng.choice([Lq, rng.randint(max(Lq, 8), 3000)])
        dt = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        causal, masked = rng.choice([True, False]), rng.choice([False, False, True])
        q = torch.randn(B, Hq, Lq, D, generator=gen).to(dt)
        k, v = (torch.randn(B, Hkv, Lk, D, generator=gen).to(dt) for _ in range(2))
        mask = None
        if masked:
            mask = torch.rand(Lq, Lk, generator=gen) > 0.2
            mask[:, 0] = True  # every row attends something: SDPA gives NaN for a row that attends nothing
        peer_mask = mask  # SDPA's is_causal is top-left aligned: bottom-right causal spelled out
        if causal and (mask is not None or Lq != Lk):
            peer_mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq) & (True if mask is None else mask)
        peer_causal = causal and peer_mask is None

        def ours(q=q, k=k, v=v, m=mask, c=causal):
            return dispatcher.attention(q, k, v, attn_mask=m, causal=c)

        def peer(q=q, k=k, v=v, m=peer_mask, c=peer_causal):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=c, enable_gqa=Hq != Hkv)

        err = (ours().float() - peer().float()).abs().max().item()
        t_ours, t_peer, ratio = paired(ours, peer, a.budget)
        ok = ratio <= RATIO or t_ours - t_peer <= SLACK_US
        kernel = dispatcher.explain("attention", q, k, v, attn_mask=mask, causal=causal).chosen
        line = (f"{'PASS' if ok else 'MISS'} {ratio:5.2f}x  ours {t_ours:9.1f} us  SDPA {t_peer:9.1f} us  "
                f"|ours - SDPA| {err:.1e}  B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} "
                f"{str(dt).removeprefix('torch.')} causal={causal} mask={masked}  [{kernel}]")
        print(line, flush=True)
        if not ok:
            misses.append(line)
    print(f"\n{a.shapes - len(misses)} of {a.shapes} shapes within {RATIO}x or +{SLACK_US:g} us of SDPA")
    for line in misses:
        print(line)


if __name__ == "__main__":
    main()
