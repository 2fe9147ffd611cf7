"""Triton row statistics for decode_step on CUDA: one program per (batch, node) row, one pass over V.

Each program walks its row in blocks of ``BLOCK_V`` and keeps the running max with its first argmax,
``sum exp(z)`` and ``sum exp(z) z`` for ``z = (x - max) / temperature``, rescaling both sums when a
block raises the max (Milakov and Gimelshein, "Online normalizer calculation for softmax", 2018). It
writes the argmax, the max, ``log sum`` and the entropy ``log sum - sum(e z) / sum``, which is what
the torch backend's ``finish`` needs to decide the step. The autotune configs are data; the key is
V and whether the sums are needed (the work per element).
"""
from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from plugins.fused.triton import cuda_ms
from plugins.torch_backend.decode_step import RowStats

INTERPRET_BLOCK_V = 64  # the interpreter runs each program in numpy: small blocks, no autotuning


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def _row_stats_kernel(x_ptr, amax_ptr, max_ptr, log_sum_ptr, ent_ptr, V, inv_t,
                      NEED_SUM: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    am = tl.zeros((), tl.int64)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        x = tl.where(x == x, x, float("-inf"))  # NaN (outside the contract) counts as masked, never as the max
        bm = tl.max(x, axis=0)
        bi = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int64) + start
        am = tl.where((bm > m) | (start == 0), bi, am)
        m_new = tl.maximum(m, bm)
        if NEED_SUM:
            # Rescale the sums to the new max; past a shift of 200 they vanish (exp(-200) = 0 in float32).
            seen = m > float("-inf")
            d = tl.minimum((tl.where(seen, m_new, 0.0) - tl.where(seen, m, 0.0)) * inv_t, 200.0)
            scale = tl.exp(-d)
            w = scale * (w - d * s)
            s = scale * s
            # -inf logits (and everything before the first finite one) give exp(z) = 0 and e * z = 0.
            finite = x > float("-inf")
            shift = tl.where(m_new > float("-inf"), m_new, 0.0)
            z = tl.where(finite, (tl.where(finite, x, 0.0) - shift) * inv_t, -200.0)
            z = tl.maximum(z, -200.0)
            e = tl.exp(z)
            s += tl.sum(e, axis=0)
            w += tl.sum(e * z, axis=0)
        m = m_new
    tl.store(amax_ptr + row, am)
    tl.store(max_ptr + row, m)
    if NEED_SUM:
        log_s = tl.log(s)
        tl.store(log_sum_ptr + row, log_s)
        tl.store(ent_ptr + row, log_s - w / s)


CONFIGS = [
    triton.Config({"BLOCK_V": 1024}, num_warps=4),
    triton.Config({"BLOCK_V": 2048}, num_warps=8),
    triton.Config({"BLOCK_V": 4096}, num_warps=8),
    triton.Config({"BLOCK_V": 8192}, num_warps=16),
]

_row_stats_tuned = triton.autotune(configs=CONFIGS, key=["V", "NEED_SUM"])(_row_stats_kernel)


def row_stats(logits: torch.Tensor, temperature: float, entropy: bool) -> RowStats:
    """The launcher: ``RowStats`` of every row, as the torch backend's ``row_stats`` gives them.

    Entropy and the sums are computed together (one more multiply-add per element); ``entropy``
    only decides whether the entropy is returned.
    """
    B, T, V = logits.shape
    x = logits.contiguous()
    if _interpreting() and x.dtype == torch.bfloat16:  # numpy, under the interpreter, has no bfloat16
        x = x.float()
    rows = B * T
    amax = torch.empty(rows, dtype=torch.int64, device=x.device)
    top = torch.empty(rows, dtype=torch.float32, device=x.device)
    need_sum = temperature > 0
    log_sum = torch.empty(rows if need_sum else 1, dtype=torch.float32, device=x.device)
    ent = torch.empty(rows if need_sum else 1, dtype=torch.float32, device=x.device)
    inv_t = min(1.0 / temperature, 3.0e38) if need_sum else 0.0
    if rows:
        if _interpreting():
            _row_stats_kernel[(rows,)](x, amax, top, log_sum, ent, V, inv_t, NEED_SUM=need_sum,
                                       BLOCK_V=INTERPRET_BLOCK_V)
        else:
            _row_stats_tuned[(rows,)](x, amax, top, log_sum, ent, V, inv_t, NEED_SUM=need_sum)
    if rows:  # NaN logits (outside the contract) can leave a masked lane's index: keep every id in [0, V)
        amax.clamp_(0, V - 1)
    shape = (B, T)
    return RowStats(amax.reshape(shape), top.reshape(shape), log_sum.reshape(shape) if need_sum else None,
                    ent.reshape(shape) if need_sum and entropy else None)


def gpu_check(device: str) -> list[dict[str, Any]]:
    """Full-size checks on a real GPU: the fused (Triton) and torch kernels judged by the op's compare
    rule against the reference, and timed with CUDA events (V = 151,936, Medusa tree and chain)."""
    from core.ops.decode_step import SPEC, chain, make_inputs, medusa_tree
    from core.spec import Sample
    from core.tuning import judge
    from plugins.fused.decode_step import decode_step as fused
    from plugins.reference.decode_step import decode_step as reference
    from plugins.torch_backend.decode_step import decode_step as torch_kernel

    rows = []
    gen = torch.Generator().manual_seed(0)
    cases = [
        ("greedy", 8, medusa_tree(64), 1.0), ("typical", 8, medusa_tree(64), 0.7),
        ("rejection", 64, chain(5), 1.0), ("greedy", 64, medusa_tree(64), 0.0),
    ]
    for rule, B, parents, temperature in cases:
        sample = make_inputs(gen, device, B=B, parents=parents, V=151936, rule=rule, temperature=temperature)
        args, attrs = SPEC.prepare(sample.args, sample.attrs)
        case = f"{rule}-b{B}-t{len(parents)}-v151936-temp{temperature:g}"
        cpu_sample = Sample(args=tuple(a.cpu() for a in args),
                            attrs={**attrs, "draft_probs": None if attrs["draft_probs"] is None else attrs["draft_probs"].cpu()})
        ref = reference(*cpu_sample.args, **cpu_sample.attrs)
        for name, fn in (("fused", fused), ("torch", torch_kernel)):
            note = ""
            try:
                out = fn(*args, **attrs)
                torch.cuda.synchronize()
                verdict = judge(SPEC, type(out)(*(o.cpu() for o in out)), ref, cpu_sample)
                ms = cuda_ms(lambda: fn(*args, **attrs))
                ok, err, note = verdict.ok, verdict.max_error, verdict.reason
            except Exception as e:  # report, do not stop the other checks
                ok, err, ms, note = False, float("inf"), float("nan"), f"{type(e).__name__}: {e}"
            rows.append({"kernel": name, "case": case, "ok": ok, "max_error": err, "ms": ms, "note": note})
        del args, attrs, sample
        torch.cuda.empty_cache()
    return rows
