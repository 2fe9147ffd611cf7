"""Split-K decode attention and the exact-row pass of the Triton attention kernels.

Decode (few query rows, a long key cache): Dao et al., "Flash-Decoding for long-context inference"
(2023). One program takes one split of the keys of one (batch, kv head) for a block of the rows of that
kv head's whole query group (group * Lq rows, so each key and value is read once for the group, not
once per query head) and writes its partial softmax (unnormalised accumulator, running max and sum, in
base 2); the merge kernel combines the splits of each row by their log-sum-exp.

The exact-row pass: the fast kernels (this decode and the tiled forward in ``attention.py``) flag a row
whose query holds inf or NaN or whose result is not finite (a non-finite key or value reaches a row only
as NaN or inf, 0 * NaN at a masked key included, and never turns finite). ``_exact_rows`` then recomputes
only the flagged rows by the op's plain rules: every key selected by the mask before any product, attended
inf and NaN as IEEE arithmetic has them (as in the plain math and SDPA's math backend), a row attending
nothing 0 and lse -inf. The flags stay on the device: every program reads its rows' flags and returns at
once where none is set, so the common path has no host synchronization and only one more launch.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
DECODE_MAX_LQ = 8  # query rows up to which the Triton forward takes the decode kernels
DECODE_BLOCK_N = 64  # keys per tile (the interpreter: 16)
DECODE_MAX_ROWS = 64  # query rows of a group per program at most
EXACT_ROWS = 64  # rows per program of the exact-row pass


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot, widened to float32 where UPCAST says so (see ``attention._dot``)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _decode_split(Q, K, V, PACC, PML, M,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, smb, smh, smi, smj,
                  Hkv, group, Lq, Lk, R, chunk, splits, D: tl.constexpr, Dv: tl.constexpr, qk_scale,
                  BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    sp = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)
    rb = tl.program_id(2)
    b = bk // Hkv
    hk = bk % Hkv
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # row r of the group: query head hk * group + r // Lq, query r % Lq
    in_r = rows < R
    h = hk * group + rows // Lq
    i = rows % Lq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqm + offs_d[None, :],
                mask=in_r[:, None] & (offs_d[None, :] < D), other=0.0)
    shift = Lk - Lq
    lo = sp * chunk
    hi = tl.minimum(Lk, lo + chunk)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        in_k = cols < hi
        kT = tl.load(K + b * skb + hk * skh + cols[None, :] * skn + offs_d[:, None],
                     mask=in_k[None, :] & (offs_d[:, None] < D), other=0.0)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + offs_dv[None, :],
                    mask=in_k[:, None] & (offs_dv[None, :] < Dv), other=0.0)
        s = _dot(q, kT, None, PRECISION, UPCAST) * qk_scale
        allowed = in_k[None, :] & in_r[:, None]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= i[:, None] + shift)
        if HAS_MASK:
            keep = tl.load(M + b * smb + h[:, None] * smh + i[:, None] * smi + cols[None, :] * smj, mask=allowed, other=0)
            allowed = allowed & (keep != 0)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
    part = (bk * splits + sp) * R + rows
    tl.store(PACC + part[:, None] * Dv + offs_dv[None, :], acc, mask=in_r[:, None] & (offs_dv[None, :] < Dv))
    tl.store(PML + part * 2, m_i, mask=in_r)
    tl.store(PML + part * 2 + 1, l_i, mask=in_r)


@triton.jit
def _decode_merge(Q, PACC, PML, O, LSE, FLAGS, sqb, sqh, sqm, sob, soh, som, Hq, Hkv, group, Lq, R, splits,
                  D: tl.constexpr, Dv: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # (batch, kv head, row of the group)
    bk = t // R
    r = t % R
    b = bk // Hkv
    h = (bk % Hkv) * group + r // Lq
    i = r % Lq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_s = offs_s < splits
    part = (bk * splits + offs_s) * R + r
    m = tl.load(PML + part * 2, mask=in_s, other=float("-inf"))
    l = tl.load(PML + part * 2 + 1, mask=in_s, other=0.0)
    acc = tl.load(PACC + part[:, None] * Dv + offs_dv[None, :], mask=in_s[:, None] & (offs_dv[None, :] < Dv), other=0.0)
    m_max = tl.max(m, 0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(in_s, tl.math.exp2(m - m_ref), 0.0)
    l_sum = tl.sum(w * l, 0)
    o = tl.sum(w[:, None] * acc, 0)
    alive = l_sum > 0.0
    o = o / tl.where(alive, l_sum, 1.0)
    lse = tl.where(alive, (m_max + tl.math.log2(tl.where(alive, l_sum, 1.0))) * 0.6931471805599453,
                   tl.where(l_sum == 0.0, float("-inf"), l_sum))
    q = tl.load(Q + b * sqb + h * sqh + i * sqm + offs_d, mask=offs_d < D, other=0.0)
    bad = (tl.max(tl.where(tl.abs(q) < float("inf"), 0, 1), 0) + tl.max(tl.where(tl.abs(o) < float("inf"), 0, 1), 0)
           + tl.where(lse < float("inf"), 0, 1) + tl.where(lse == lse, 0, 1))
    row = (b * Hq + h) * Lq + i
    tl.store(O + b * sob + h * soh + i * som + offs_dv, o.to(O.dtype.element_ty), mask=offs_dv < Dv)
    tl.store(LSE + row, lse)
    tl.store(FLAGS + row, (bad > 0).to(tl.int8))


@triton.jit
def _exact_rows(Q, K, V, O, LSE, FLAGS, M, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                smb, smh, smi, smj, Hq, group, Lq, Lk, nrows, D: tl.constexpr, Dv: tl.constexpr, qk_scale,
                ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    first = tl.program_id(0).to(tl.int64) * ROWS
    for t in range(0, ROWS):
        row = first + t
        flag = tl.load(FLAGS + row, mask=row < nrows, other=0)
        if flag != 0:
            i = row % Lq
            bh = row // Lq
            b = bh // Hq
            h = bh % Hq
            hk = h // group
            q = tl.load(Q + b * sqb + h * sqh + i * sqm + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            m = tl.max(tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), 0)
            l = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), 0)
            nan = tl.sum(tl.zeros([BLOCK_N], dtype=tl.int32), 0)
            acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
            for start in range(0, Lk, BLOCK_N):
                cols = start + offs_n
                allowed = cols < Lk
                if CAUSAL:
                    allowed = allowed & (cols <= i + Lk - Lq)
                if HAS_MASK:
                    keep = tl.load(M + b * smb + h * smh + i * smi + cols * smj, mask=allowed, other=0)
                    allowed = allowed & (keep != 0)
                k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + offs_d[None, :],
                            mask=allowed[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
                s = tl.where(allowed, tl.sum(q[None, :] * k, 1) * qk_scale, float("-inf"))
                nan += tl.sum(tl.where(s != s, 1, 0), 0)
                m_new = tl.maximum(m, tl.max(tl.where(s != s, float("-inf"), s), 0))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.where(allowed, tl.math.exp2(s - m_ref), 0.0)
                alpha = tl.math.exp2(m - m_ref)
                # Each value selected by the mask before the product: a masked one reaches nothing, an
                # attended inf or NaN does what IEEE arithmetic does (0 * inf included).
                v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + offs_dv[None, :],
                            mask=allowed[:, None] & (offs_dv[None, :] < Dv), other=0.0).to(tl.float32)
                acc = acc * alpha + tl.sum(p[:, None] * v, 0)
                l = l * alpha + tl.sum(p, 0)
                m = m_new
            poisoned = (nan > 0) | (m == float("inf"))
            dead = m == float("-inf")
            o = tl.where(poisoned, float("nan"), tl.where(dead, 0.0, acc / tl.where(dead | poisoned, 1.0, l)))
            lse = tl.where(nan > 0, float("nan"), tl.where(m == float("inf"), float("inf"), tl.where(
                dead, float("-inf"), (m + tl.math.log2(tl.where(dead | poisoned, 1.0, l))) * 0.6931471805599453)))
            tl.store(O + b * sob + h * soh + i * som + offs_dv, o.to(O.dtype.element_ty), mask=offs_dv < Dv)
            tl.store(LSE + row, lse)


# -- launchers -------------------------------------------------------------------------------------

def _precision(dtype: torch.dtype) -> dict[str, Any]:
    upcast = dtype == torch.bfloat16 and _interpreting()
    return {"PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}


def _programs_wanted(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def exact_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
               flags: torch.Tensor, *, causal: bool, scale: float, m: torch.Tensor, ms: tuple[int, ...],
               has_mask: bool, block_d: int, block_dv: int) -> None:
    """Recompute, in place, the rows of ``o`` and ``lse`` whose int8 flag is set (see the module doc)."""
    B, Hq, Lq, D = q.shape
    nrows = B * Hq * Lq
    _exact_rows[(triton.cdiv(nrows, EXACT_ROWS),)](
        q, k, v, o, lse, flags, m, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), *ms,
        Hq, Hq // k.shape[1], Lq, k.shape[2], nrows, D, v.shape[3], scale * LOG2E,
        ROWS=EXACT_ROWS, BLOCK_N=16 if _interpreting() else 32, BLOCK_D=block_d, BLOCK_DV=block_dv,
        CAUSAL=causal, HAS_MASK=has_mask, num_warps=4)


def decode_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                   m: torch.Tensor, ms: tuple[int, ...], has_mask: bool, block_d: int,
                   block_dv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, lse, int8 flags per row) by split-K over the keys and a log-sum-exp merge; k and v are read in
    place through their strides (last dimension contiguous)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv
    R = group * Lq
    block_r = max(16, min(DECODE_MAX_ROWS, triton.next_power_of_2(R)))
    block_n = 16 if _interpreting() else DECODE_BLOCK_N
    row_blocks = triton.cdiv(R, block_r)
    base = B * Hkv * row_blocks
    splits = max(1, min(triton.cdiv(Lk, 4 * block_n), triton.cdiv(_programs_wanted(q.device), base)))
    chunk = triton.cdiv(triton.cdiv(Lk, splits), block_n) * block_n
    splits = triton.cdiv(Lk, chunk)
    pacc = torch.empty(B * Hkv * splits * R, Dv, device=q.device, dtype=torch.float32)
    pml = torch.empty(B * Hkv * splits * R, 2, device=q.device, dtype=torch.float32)
    o = torch.empty(B, Hq, Lq, Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, Lq, device=q.device, dtype=torch.float32)
    flags = torch.empty(B * Hq * Lq, device=q.device, dtype=torch.int8)
    _decode_split[(splits, B * Hkv, row_blocks)](
        q, k, v, pacc, pml, m, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *ms, Hkv, group, Lq, Lk, R, chunk, splits, D, Dv, scale * LOG2E,
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=causal, HAS_MASK=has_mask,
        num_warps=4, **_precision(q.dtype))
    _decode_merge[(B * Hkv * R,)](
        q, pacc, pml, o, lse, flags, q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2),
        Hq, Hkv, group, Lq, R, splits, D, Dv, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d,
        BLOCK_DV=block_dv, num_warps=1)
    return o, lse, flags
