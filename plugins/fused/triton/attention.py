"""FlashAttention-2 in Triton, forward and backward, with the attention op's semantics.

The shape follows Triton's tutorial ``06-fused-attention.py``: kernels, their launchers, and the
autotune configs as data with a ``key`` naming what invalidates the choice. Tri Dao's FlashAttention-2
(2023): the forward pass streams key/value blocks past a query block with an online softmax (running
max ``m`` and sum ``l`` in base 2), the backward pass recomputes the probabilities from the saved
log-sum-exp. Where this differs from the tutorial:

- causal is bottom-right aligned (query i attends key j iff j <= i + Lk - Lq), for any Lq and Lk;
  tiles wholly past the diagonal are never visited, and tiles wholly inside it skip the masking;
- GQA/MQA: query head h reads key/value head h // (Hq // Hkv); the dk/dv kernel sums over the group;
- head dims up to 256, padded to a power of two with masked loads (D and Dv may differ);
- a boolean ``attn_mask`` (any broadcast of [B, Hq, Lq, Lk], read through strides, 0 where it broadcasts);
- a row that may attend nothing gets o = 0 and lse = -inf; non-finite q, k or v: the forward flags every
  row whose query or result is not finite and ``attention_decode.exact_rows`` recomputes those rows by the
  op's plain rules, on the device (no host synchronization); the backward kernels read non-finite keys
  and values as 0 (exact for masked ones; after a flagged forward the autograd Function takes the exact
  dense gradients instead);
- few query rows (Lq <= 8) take the split-K decode kernels of ``attention_decode``;
- two backward kernels, dk/dv per key block and dq per query block, so nothing is accumulated atomically.

``gpu_check(device)`` checks and times the kernels at full size on a real GPU for ``scripts/gpu_check.py``.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from plugins.fused.triton import attention_decode as dec

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot, with the operands widened to float32 where UPCAST says so: the interpreter multiplies
    bfloat16 tiles as their integer storage (triton 3.x ``create_dot``), so tests run them widened."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# -- forward ---------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, offs_n, offs_d, offs_dv, lo, hi,
               Lq, Lk, D: tl.constexpr, Dv: tl.constexpr, shift, qk_scale, stride_kn, stride_vn, stride_mj,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_k = cols < Lk
        if MASKED:
            kT = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                         mask=in_k[None, :] & (offs_d[:, None] < D), other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :],
                        mask=in_k[:, None] & (offs_dv[None, :] < Dv), other=0.0)
        else:  # whole key tiles inside [0, Lk): only padded head dims are masked (constant when D is a power of 2)
            kT = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=offs_d[:, None] < D, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :], mask=offs_dv[None, :] < Dv, other=0.0)
        s = _dot(q, kT, None, PRECISION, UPCAST) * qk_scale
        if MASKED:
            allowed = in_k[None, :] & (offs_m[:, None] < Lq)
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + shift)
            if HAS_MASK:
                keep = tl.load(mask_base + cols[None, :] * stride_mj, mask=allowed, other=0)
                allowed = allowed & (keep != 0)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing attended yet stays 0
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


# Autotune configs as data: (BLOCK_M, BLOCK_N, num_warps, num_stages). Few, because on a GPU each is a
# compile of seconds per head dim, dtype and mask kind; the interpreter (tests) runs one small one.
FWD_CONFIGS = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (16, 64, 4, 3))
DQ_CONFIGS = ((128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 2), (16, 64, 4, 3))
DKDV_CONFIGS = ((32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 2))
INTERPRETER_CONFIG = (32, 64, 4, 1)
AUTOTUNE_KEY = ["BUCKET_Q", "BUCKET_K", "BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_MASK"]


def _configs(table: tuple[tuple[int, int, int, int], ...]) -> list[Any]:
    rows = (INTERPRETER_CONFIG,) if _interpreting() else table
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in rows]


def _prune_fwd(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    """Big tiles do not fit shared memory at D = 256; 16-row tiles are only worth it for decoding."""
    args = {**named_args, **kwargs}
    wide = max(args["BLOCK_D"], args["BLOCK_DV"]) > 128
    short = args["Lq"] <= 16
    kept = [c for c in configs if not (wide and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64)
            and (c.kwargs["BLOCK_M"] == 16) == short]
    return kept or configs[:1]


@triton.autotune(configs=_configs(FWD_CONFIGS), key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, FLAGS, M,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, smb, smh, smi, smj,
              Hq, group, Lq, Lk, D: tl.constexpr, Dv: tl.constexpr, qk_scale, BUCKET_Q, BUCKET_K,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B * H * L * D may pass 2**31
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_q = offs_m < Lq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = M + b * smb + h * smh + offs_m[:, None] * smi
    shift = Lk - Lq
    # [0, full): key blocks every row of this block may attend wholly; [full, hi): the rest it may reach.
    if CAUSAL:
        hi = tl.minimum(Lk, tl.maximum(0, start_m * BLOCK_M + BLOCK_M + shift))
        full = tl.minimum(hi, tl.maximum(0, start_m * BLOCK_M + shift + 1))
    else:
        hi = Lk
        full = Lk
    if HAS_MASK:
        full = 0
    full = (full // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, offs_n, offs_d, offs_dv,
                               0, full, Lq, Lk, D, Dv, shift, qk_scale, skn, svn, smj,
                               BLOCK_N, False, CAUSAL, HAS_MASK, PRECISION, UPCAST)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, offs_n, offs_d, offs_dv,
                               full, hi, Lq, Lk, D, Dv, shift, qk_scale, skn, svn, smj,
                               BLOCK_N, True, CAUSAL, HAS_MASK, PRECISION, UPCAST)
    alive = l_i > 0.0
    l_safe = tl.where(alive, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(alive, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=in_q[:, None] & (offs_dv[None, :] < Dv))
    tl.store(LSE + bh * Lq + offs_m, lse, mask=in_q)
    # Rows the exact-row pass recomputes: a non-finite query, or a result that is not finite.
    bad = tl.max(tl.where(tl.abs(q) < float("inf"), 0, 1), 1) + tl.max(tl.where(tl.abs(o) < float("inf"), 0, 1), 1)
    tl.store(FLAGS + bh * Lq + offs_m, (bad > 0).to(tl.int8), mask=in_q)


# -- backward --------------------------------------------------------------------------------------

@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, cols, offs_m, offs_d, offs_dv,
                    lo, hi, Lq, Lk, D: tl.constexpr, Dv: tl.constexpr, shift, qk_scale, sqm, sdom, smi, smj,
                    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        in_q = rows < Lq
        q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :], mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_base + rows[:, None] * sdom + offs_dv[None, :], mask=in_q[:, None] & (offs_dv[None, :] < Dv),
                     other=0.0)
        lse = tl.load(lse_base + rows, mask=in_q, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # P = 0 on dead rows
        delta = tl.load(delta_base + rows, mask=in_q, other=0.0)
        sT = _dot(k, tl.trans(q), None, PRECISION, UPCAST) * qk_scale
        if MASKED:
            allowed = (cols[:, None] < Lk) & in_q[None, :]
            if CAUSAL:
                allowed = allowed & (cols[:, None] <= rows[None, :] + shift)
            if HAS_MASK:
                keep = tl.load(mask_base + rows[None, :] * smi + cols[:, None] * smj, mask=allowed, other=0)
                allowed = allowed & (keep != 0)
            sT = tl.where(allowed, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        dv += _dot(pT.to(do.dtype), do, None, PRECISION, UPCAST)
        dpT = _dot(v, tl.trans(do), None, PRECISION, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(q.dtype), q, None, PRECISION, UPCAST)
    return dk, dv


def _prune_bwd(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
    args = {**named_args, **kwargs}
    wide = max(args["BLOCK_D"], args["BLOCK_DV"]) > 128
    kept = [c for c in configs if not (wide and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 32 * 64)]
    return kept or configs[-1:]


@triton.autotune(configs=_configs(DKDV_CONFIGS), key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, M,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, smb, smh, smi, smj,
                   Hq, Hkv, group, Lq, Lk, D: tl.constexpr, Dv: tl.constexpr, scale, qk_scale, BUCKET_Q, BUCKET_K,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)
    b = bk // Hkv
    hk = bk % Hkv
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_k = cols < Lk
    k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + offs_d[None, :],
                mask=in_k[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + offs_dv[None, :],
                mask=in_k[:, None] & (offs_dv[None, :] < Dv), other=0.0)
    k = tl.where(tl.abs(k) < float("inf"), k, 0.0)  # non-finite keys/values are read as 0 (see the module doc)
    v = tl.where(tl.abs(v) < float("inf"), v, 0.0)
    shift = Lk - Lq
    # Query blocks before lo reach none of these keys; from mid on, every row reaches all of them.
    if CAUSAL:
        lo = (tl.maximum(0, start_n * BLOCK_N - shift) // BLOCK_M) * BLOCK_M
        mid = tl.maximum(lo, tl.cdiv(tl.maximum(0, start_n * BLOCK_N + BLOCK_N - 1 - shift), BLOCK_M) * BLOCK_M)
    else:
        lo = 0
        mid = 0
    if HAS_MASK:
        mid = tl.maximum(mid, Lq)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        row_base = (b * Hq + h) * Lq
        mask_base = M + b * smb + h * smh
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, mask_base, cols,
                                 offs_m, offs_d, offs_dv, lo, mid, Lq, Lk, D, Dv, shift, qk_scale, sqm, sdom, smi, smj,
                                 BLOCK_M, True, CAUSAL, HAS_MASK, PRECISION, UPCAST)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, mask_base, cols,
                                 offs_m, offs_d, offs_dv, mid, Lq, Lq, Lk, D, Dv, shift, qk_scale, sqm, sdom, smi, smj,
                                 BLOCK_M, False, CAUSAL, HAS_MASK, PRECISION, UPCAST)
    out = (b * Hkv + hk) * Lk
    tl.store(DK + (out + cols[:, None]) * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=in_k[:, None] & (offs_d[None, :] < D))
    tl.store(DV + (out + cols[:, None]) * Dv + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=in_k[:, None] & (offs_dv[None, :] < Dv))


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, offs_n, offs_d, offs_dv, lo, hi,
                  Lq, Lk, D: tl.constexpr, Dv: tl.constexpr, shift, qk_scale, skn, svn, smj,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_k = cols < Lk
        if MASKED:
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=in_k[:, None] & (offs_d[None, :] < D),
                        other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + offs_dv[None, :], mask=in_k[:, None] & (offs_dv[None, :] < Dv),
                        other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + offs_dv[None, :], mask=offs_dv[None, :] < Dv, other=0.0)
        if MASKED:
            k = tl.where(tl.abs(k) < float("inf"), k, 0.0)
            v = tl.where(tl.abs(v) < float("inf"), v, 0.0)
        s = _dot(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale
        if MASKED:
            allowed = in_k[None, :] & (offs_m[:, None] < Lq)
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + shift)
            if HAS_MASK:
                keep = tl.load(mask_base + cols[None, :] * smj, mask=allowed, other=0)
                allowed = allowed & (keep != 0)
            s = tl.where(allowed, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), None, PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, None, PRECISION, UPCAST)
    return dq


@triton.autotune(configs=_configs(DQ_CONFIGS), key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, M,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, smb, smh, smi, smj,
                 Hq, group, Lq, Lk, D: tl.constexpr, Dv: tl.constexpr, scale, qk_scale, BUCKET_Q, BUCKET_K,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B * H * L * D may pass 2**31
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_q = offs_m < Lq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :],
                 mask=in_q[:, None] & (offs_dv[None, :] < Dv), other=0.0)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=in_q, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=in_q, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = M + b * smb + h * smh + offs_m[:, None] * smi
    shift = Lk - Lq
    if CAUSAL:
        hi = tl.minimum(Lk, tl.maximum(0, start_m * BLOCK_M + BLOCK_M + shift))
        full = tl.minimum(hi, tl.maximum(0, start_m * BLOCK_M + shift + 1))
    else:
        hi = Lk
        full = Lk
    if HAS_MASK:
        full = 0
    full = (full // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, offs_n, offs_d, offs_dv, 0, full,
                       Lq, Lk, D, Dv, shift, qk_scale, skn, svn, smj, BLOCK_N, False, CAUSAL, HAS_MASK, PRECISION, UPCAST)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, offs_n, offs_d, offs_dv, full, hi,
                       Lq, Lk, D, Dv, shift, qk_scale, skn, svn, smj, BLOCK_N, True, CAUSAL, HAS_MASK, PRECISION, UPCAST)
    tl.store(DQ + (bh * Lq + offs_m[:, None]) * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=in_q[:, None] & (offs_d[None, :] < D))


# -- launchers -------------------------------------------------------------------------------------

def _bucket(n: int) -> int:
    return n if n <= 1 else 1 << (n - 1).bit_length()


def _dims(q: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    """Head dims padded to a power of two, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(q.shape[3])), max(16, triton.next_power_of_2(v.shape[3]))


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor, Lk: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The mask (any broadcast of [B, Hq, Lq, Lk]) as bytes with full-shape strides, 0 where it broadcasts;
    a dummy pointer and zero strides when there is none."""
    if mask is None:
        return q, (0, 0, 0, 0)
    full = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(*q.shape[:3], Lk)
    return full.view(torch.uint8), tuple(full.stride())


def _precision(dtype: torch.dtype) -> dict[str, Any]:
    """float32 keeps full precision in tl.dot (TF32 would miss the compare rule); see ``_dot`` for UPCAST."""
    upcast = dtype == torch.bfloat16 and _interpreting()
    return {"PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
            mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o in q's dtype, lse float32, int8 flags of the rows that took the exact path) for q [B, Hq, Lq, D],
    k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]: the decode kernels for Lq <= DECODE_MAX_LQ, else the tiles;
    then the exact-row pass. Nothing here reads a device value on the host."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    block_d, block_dv = _dims(q, v)
    m, ms = _mask_args(mask, q, Lk)
    if Lq <= dec.DECODE_MAX_LQ:
        k = k if k.stride(3) == 1 else k.contiguous()
        v = v if v.stride(3) == 1 else v.contiguous()
        o, lse, flags = dec.decode_forward(q, k, v, causal=causal, scale=scale, m=m, ms=ms, has_mask=mask is not None,
                                           block_d=block_d, block_dv=block_dv)
    else:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = torch.empty(B, Hq, Lq, Dv, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, Hq, Lq, device=q.device, dtype=torch.float32)
        flags = torch.empty(B * Hq * Lq, device=q.device, dtype=torch.int8)

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            return triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq

        _attn_fwd[grid](q, k, v, o, lse, flags, m, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                        k.stride(2), v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), *ms,
                        Hq, Hq // Hkv, Lq, Lk, D, Dv, scale * LOG2E, _bucket(Lq), _bucket(Lk),
                        BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=causal, HAS_MASK=mask is not None,
                        **_precision(q.dtype))
    dec.exact_rows(q, k, v, o, lse, flags, causal=causal, scale=scale, m=m, ms=ms, has_mask=mask is not None,
                   block_d=block_d, block_dv=block_dv)
    return o, lse, flags


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
             delta: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) in the inputs' dtype; ``delta`` is rowsum(o * do) minus the cotangent of lse."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous().to(q.dtype)
    lse, delta = lse.contiguous(), delta.float().contiguous()
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    block_d, block_dv = _dims(q, v)
    m, ms = _mask_args(mask, q, Lk)
    common = dict(BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=causal, HAS_MASK=mask is not None,
                  **_precision(q.dtype))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2), *ms)

    def grid_kv(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv

    def grid_q(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq

    _attn_bwd_dkdv[grid_kv](q, k, v, do, lse, delta, dk, dv, m, *strides, Hq, Hkv, Hq // Hkv, Lq, Lk, D, Dv,
                            scale, scale * LOG2E, _bucket(Lq), _bucket(Lk), **common)
    _attn_bwd_dq[grid_q](q, k, v, do, lse, delta, dq, m, *strides, Hq, Hq // Hkv, Lq, Lk, D, Dv,
                         scale, scale * LOG2E, _bucket(Lq), _bucket(Lk), **common)
    return dq, dk, dv


# -- the GPU check ---------------------------------------------------------------------------------

GPU_CHECKS = (  # name, dtype, B, Hq, Hkv, Lq, Lk, D, causal, a key padding mask with rows that attend nothing
    ("gqa-l2048-d128-causal", torch.bfloat16, 2, 16, 4, 2048, 2048, 128, True, False),
    ("mqa-lq1537-lk700-d59-causal", torch.float16, 1, 8, 1, 1537, 700, 59, True, False),
    ("lq1000-lk3001-d256-mask", torch.bfloat16, 2, 8, 8, 1000, 3001, 256, False, True),
    ("decode-lq1-lk4096-d128", torch.bfloat16, 4, 32, 8, 1, 4096, 128, False, False),
    ("float32-l1024-d64-causal", torch.float32, 1, 4, 4, 1024, 1024, 64, True, False),
)
GPU_TIMING = (2, 16, 4096, 128)  # B, H, L, D (bfloat16)
MATMUL_N = 8192


def _flops(B: int, H: int, Lq: int, Lk: int, D: int, causal: bool) -> float:
    """The issue's count: 4 * B * H * Lq * Lk * D for the forward pass, about half of it when causal."""
    return 4.0 * B * H * Lq * Lk * D * (0.5 if causal else 1.0)


def _row(case: str, ok: bool, ms: float, note: str, max_error: float = float("nan")) -> dict[str, Any]:
    return {"kernel": "attention[fused/triton]", "case": case, "ok": ok, "max_error": max_error, "ms": ms, "note": note}


def gpu_check(device: str = "cuda", *, checks: Any = GPU_CHECKS, timing: tuple[int, int, int, int] = GPU_TIMING,
              matmul_n: int = MATMUL_N, bench: Any = None) -> list[dict[str, Any]]:
    """Check forward and gradients at full size against the spec's compare rule (float64 torch math as
    the oracle), then time the kernels at L=4096, D=128, bfloat16 against a bfloat16 matrix product
    measured in the same run. One row per check or timing; a failure becomes a row, never an exception."""
    from core.ops.attention import SPEC, make_inputs, plain_math
    from core.spec import Sample
    from plugins.fused.attention import TRITON, FusedAttention

    if bench is None:
        from triton.testing import do_bench

        def bench(fn: Any) -> float:
            fn()  # the first call autotunes: keep it out of the measurement
            return float(do_bench(fn))

    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for name, dtype, B, Hq, Hkv, Lq, Lk, D, causal, padded in checks:
        case = f"{name} {str(dtype).removeprefix('torch.')}"
        try:
            q, k, v = make_inputs(gen, device, dtype, B, Hq, Hkv, Lq, Lk, D)
            mask = None
            if padded:
                mask = torch.rand(B, 1, Lq, Lk, generator=gen) < 0.9
                mask[:, :, ::97] = False
                mask = mask.to(device)
            scale = D ** -0.5
            sample = Sample(args=(q, k, v), attrs={"causal": causal, "scale": scale, "attn_mask": mask, "return_lse": True})
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
            o, lse = FusedAttention.apply(*leaves, causal, scale, mask, TRITON)
            go = torch.randn(o.shape, generator=gen).to(device=device, dtype=dtype)
            grads = torch.autograd.grad(o, leaves, go)
            exact = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
            ref_o, ref_lse = plain_math(*exact, causal, scale, mask)
            ref_grads = torch.autograd.grad(ref_o, exact, go.double())
            fwd = SPEC.compare((o, lse), (ref_o.detach(), ref_lse.detach()), sample)
            bwd = SPEC.compare_grads(grads, ref_grads, sample, (go, None))
            del exact, ref_o, ref_lse, ref_grads, grads
            ms = bench(lambda: forward(q, k, v, causal=causal, scale=scale, mask=mask))
            rows.append(_row(case, fwd.ok and bwd.ok, ms, fwd.reason or (f"gradients: {bwd.reason}" if bwd.reason else
                             "forward and gradients within the compare rule; ms is the forward"),
                             max(fwd.max_error, bwd.max_error)))
        except Exception as e:  # one broken case must not hide the others
            rows.append(_row(case, False, float("nan"), f"raised {type(e).__name__}: {str(e)[:200]}"))
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows + _gpu_timings(device, timing, matmul_n, bench)


def _gpu_timings(device: str, timing: tuple[int, int, int, int], matmul_n: int, bench: Any) -> list[dict[str, Any]]:
    import torch.nn.functional as F

    from plugins.fused.attention import TRITON, FusedAttention

    n = matmul_n
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_tflops = 2.0 * n ** 3 / (bench(lambda: a @ b) * 1e-3) / 1e12
    del a, b
    B, H, L, D = timing
    gen = torch.Generator().manual_seed(1)
    q, k, v, go = (torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=torch.bfloat16) for _ in range(4))
    shape = f"B={B} H={H} L={L} D={D} bf16"
    rows = []
    for causal in (False, True):
        flops = _flops(B, H, L, L, D, causal)
        tag = " causal" if causal else ""
        try:
            ms = bench(lambda: forward(q, k, v, causal=causal, scale=D ** -0.5, mask=None))
            sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            tflops = flops / (ms * 1e-3) / 1e12
            rows.append(_row(f"fwd {shape}{tag}", tflops >= 0.5 * mm_tflops, ms,
                             f"{tflops:.0f} TFLOP/s = {tflops / mm_tflops:.0%} of the bf16 matmul's {mm_tflops:.0f} "
                             f"(target >= 50%); torch sdpa {sdpa:.3f} ms"))
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

            def both() -> None:
                o, _ = FusedAttention.apply(*leaves, causal, D ** -0.5, None, TRITON)
                o.backward(go)

            def both_sdpa() -> None:
                F.scaled_dot_product_attention(*leaves, is_causal=causal).backward(go)

            ms = bench(both)
            sdpa = bench(both_sdpa)
            tflops = 3.5 * flops / (ms * 1e-3) / 1e12  # the backward counts about 2.5 times the forward
            rows.append(_row(f"fwd+bwd {shape}{tag}", True, ms,
                             f"{tflops:.0f} TFLOP/s = {tflops / mm_tflops:.0%} of the matmul's; torch sdpa {sdpa:.3f} ms"))
        except Exception as e:
            rows.append(_row(f"timing {shape}{tag}", False, float("nan"), f"raised {type(e).__name__}: {str(e)[:200]}"))
    return rows
