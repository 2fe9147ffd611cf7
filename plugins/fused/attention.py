"""Fused attention: FlashAttention-style tiled kernels, C++ on the CPU and Triton on CUDA.

Both paths tile q, k and v, keep a running max and sum per query row (the online softmax) and never
write the [Lq, Lk] score matrix; the backward pass recomputes the scores from the saved log-sum-exp
(Dao, "FlashAttention-2", 2023, Algorithms 1 and 2). The C++ kernels are ``csrc/attention.cpp``,
the Triton kernels ``triton/attention.py``; one ``torch.autograd.Function`` serves both.

Few query rows (Lq <= 8, the decode step; in C++ also up to 32 under GQA, and up to 15 of MHA heads on
AVX-512: chunked prefill, speculative verification; but in C++ float32 MHA heads of up to 16 dims from 4 rows
on keep the tiles) take split-K kernels instead (flash-decoding): the keys are
split across threads, each split's partial softmax kept with its log-sum-exp and merged; under GQA one
task takes all the query heads of a key/value head, so each key and value is read once for the group.
Both kernels choose by shape themselves; the C++ one reads float32, bfloat16 or float16 q, k and v in
place, and its eager call writes a 16-bit output row by row (no widening copy before, no rounding pass after).

Non-finite inputs, at no cost to finite ones: no pass over q, k and v before the kernels. Each kernel
checks every result row where it writes it (its query, its output, its lse; a few values a row): finite
inputs give a finite row (but for overflow), while a non-finite key or value reaches a row only as NaN
or inf (a masked one through 0 * NaN in a tile product) and NaN or inf never turns finite again. So a
row that comes out non-finite, or whose query is, is recomputed by the op's plain rules (keys selected
by the mask before any product, attended inf and NaN as IEEE arithmetic has them, as in the reference
and SDPA's math backend), in float64 in C++, and by a device-side pass over flagged rows in Triton (no
host synchronization in the forward). The backward pass takes the exact dense gradients of the torch
kernel when the forward recomputed any row, or (C++) when its gradients come out non-finite (a masked
non-finite key meets a zero dS in a tile product); the Triton backward reads the flags there.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch

from core.spec import dtype_name
from plugins.fused import _build
from plugins.torch_backend.attention import _finite as torch_finite
from plugins.torch_backend.attention import _sdpa, _sdpa_check, sdpa_behind
from plugins.torch_backend.attention import attention as torch_attention
from registry import Kernel

OP = "attention"
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM_CUDA = 256
# Tile sizes of the C++ kernels (query rows, keys), measured at B=1, H=8, L=2048, D=64 on AVX-512 and AVX2
# builds (a 128 x 256 score tile, 128 KiB, stays in a Zen 3 core's 512 KiB L2 beside its k and v tiles).
# The tile along the parallel axis shrinks (halving, down to 32) until each thread has 4 tiles to take:
# the forward's query tile in C++ (which knows how many threads a call runs on), the backward's key tile here.
CPU_FWD_BLOCKS = (128, 256)
CPU_BWD_BLOCKS = (128, 128)


def _cpu_blocks(blocks: tuple[int, int], heads: int, length: int, axis: int) -> tuple[int, int]:
    """``blocks`` with its ``axis`` tile shrunk until ``heads * ceil(length / tile)`` feeds every thread."""
    tiles = list(blocks)
    threads = torch.get_num_threads()
    while tiles[axis] > 32 and heads * -(-length // tiles[axis]) < 4 * threads:
        tiles[axis] //= 2
    return tiles[0], tiles[1]


def _mask4(attn_mask: torch.Tensor | None, full: tuple[int, int, int, int]) -> torch.Tensor | None:
    """The caller's mask as a 4-D view of the full [B, Hq, Lq, Lk] shape (stride 0 where it broadcasts)."""
    if attn_mask is None:
        return None
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).expand(full)


class _Cpu:
    """The C++ path (``CPP``): float32 tiles whatever the input dtype, results cast back."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return _build.library(OP).attention_fwd(q, k, v, mask, causal, scale, *CPU_FWD_BLOCKS)  # (o, lse, rare)

    @staticmethod
    def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                 delta: torch.Tensor, causal: bool, scale: float, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        lib = _build.library(OP)
        q32, k32, v32, do32 = (t.float().contiguous() for t in (q, k, v, do))
        blocks = _cpu_blocks(CPU_BWD_BLOCKS, k.shape[0] * k.shape[1], k.shape[2], 1)
        return lib.attention_bwd(q32, k32, v32, do32, lse.contiguous(), delta.contiguous(), mask, causal, scale,
                                 *blocks)


class _Cuda:
    """The Triton path (``TRITON``; imported on first use, so this module imports without triton)."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        from plugins.fused.triton import attention as tri

        return tri.forward(q, k, v, causal=causal, scale=scale, mask=mask)  # (o, lse, rare flags on the device)

    @staticmethod
    def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                 delta: torch.Tensor, causal: bool, scale: float, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        from plugins.fused.triton import attention as tri

        return tri.backward(q, k, v, do, lse, delta, causal=causal, scale=scale, mask=mask)


CPP, TRITON = _Cpu, _Cuda


def _forward(path: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
             attn_mask: torch.Tensor | None) -> tuple[Any, torch.Tensor, torch.Tensor, Any]:
    """(the 4-D mask, o as the kernel wrote it, lse, the kernel's rare-path flag)."""
    B, Hq, Lq, _ = q.shape
    mask = _mask4(attn_mask, (B, Hq, Lq, k.shape[2]))
    if q.numel() == 0 or k.shape[2] == 0:  # nothing to attend: o = 0, lse = -inf
        return mask, q.new_zeros(B, Hq, Lq, v.shape[3]), torch.full((B, Hq, Lq), float("-inf"), device=q.device), False
    return (mask, *path.forward(q, k, v, causal, scale, mask))


def _exact_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None,
                 causal: bool, scale: float, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The gradients through the torch kernel's exact dense path (the rare path: inputs holding inf or NaN)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        o, lse = torch_attention(*leaves, causal=causal, scale=scale, attn_mask=mask, return_lse=True)
        outs, cotangents = [o], [do.to(o.dtype)]
        if dlse is not None:
            outs.append(lse)
            cotangents.append(dlse.to(lse.dtype))
        grads = torch.autograd.grad(outs, leaves, cotangents, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v)))


class FusedAttention(torch.autograd.Function):
    """(o, lse) by the tiled (or, for few query rows, the split-K decode) forward; (dq, dk, dv) by the
    tiled backward from the saved lse.

    ``path`` is ``CPP`` or ``TRITON``; the kernel picks it by device, tests pick TRITON on CPU tensors
    to run the Triton kernels in the interpreter. The forward kernels handle non-finite inputs themselves
    (see the module doc) and say whether any row took their exact path; the backward takes the exact
    dense gradients after such a forward.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                attn_mask: torch.Tensor | None, path: Any) -> tuple[torch.Tensor, torch.Tensor]:
        mask, o, lse, rare = _forward(path, q, k, v, causal, scale, attn_mask)
        ctx.causal, ctx.scale, ctx.mask, ctx.path, ctx.rare = causal, scale, mask, path, rare
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.set_materialize_grads(False)
        return o.to(q.dtype), lse

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        if q.numel() == 0 or k.shape[2] == 0 or (do is None and dlse is None):
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None, None
        do = torch.zeros_like(o) if do is None else do
        args = (ctx.causal, ctx.scale, ctx.mask)
        rare = ctx.rare
        if isinstance(rare, torch.Tensor):  # Triton's per-row flags: read here, the backward's one host sync
            rare = bool(rare.any())
        if rare:
            return (*_exact_grads(q, k, v, do, dlse, *args), None, None, None, None)
        # dS = P * (dP - delta), with delta = rowsum(o * do) - dlse (FlashAttention-2, eq. for D_i).
        delta = (o.float() * do.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        dq, dk, dv = ctx.path.backward(q, k, v, do, lse, delta, *args)
        # The C++ tiles multiply a masked key by a zero dS (0 * NaN); finite gradients show none was
        # non-finite (one reduction each, no temporary), otherwise the exact path decides.
        if ctx.path is CPP and not math.isfinite(float(dq.sum()) + float(dk.sum()) + float(dv.sum())):
            return (*_exact_grads(q, k, v, do, dlse, *args), None, None, None, None)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def attend(path: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
           attn_mask: torch.Tensor | None, return_lse: bool) -> Any:
    """The kernel on ``path`` (CPP or TRITON); no pass over the inputs before it (see the module doc)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        o, lse = FusedAttention.apply(q, k, v, causal, scale, attn_mask, path)
    else:  # no graph to record: the forward alone, without the autograd Function's per-call cost
        _, o, lse, _ = _forward(path, q, k, v, causal, scale, attn_mask)
        o = o.to(q.dtype)
    return (o, lse) if return_lse else o


# a level ("avx512", "avx2", "scalar") -> its pybind11 attention_fwd_eager, looked up by the level in force
# straight from _build's two globals (``default_isa`` spelled out, as plugins/fused/precision_cast.py does):
# a small call costs a few microseconds, and each function call on its way a tenth of one.
_eager_ops: dict[str, Any] = {}


def _pybind(table: dict[str, Any], name: str) -> Any:
    """The pybind11 function ``name`` of the level in force, built or loaded, and kept in ``table`` under
    the level (the callers look it up there first)."""
    _build.library(OP)  # builds or loads the level in force
    fn = table[_build.default_isa()] = getattr(_build.module(OP), name)
    return fn


def _eager_forward() -> Any:
    """The C++ eager forward of the level in force: (o in q's dtype, lse), through pybind11 (about 1.8 us
    less a call than torch.ops)."""
    return _pybind(_eager_ops, "attention_fwd_eager")


_grad_enabled = torch.is_grad_enabled


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
              attn_mask: torch.Tensor | None, return_lse: bool) -> Any:
    """FlashAttention-2 forward (and, through autograd, backward): C++ for CPU tensors, Triton for CUDA."""
    if q.is_cpu and not (_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # the common CPU call, no graph, in as few steps as possible (a small call's time is mostly these
        # steps): what attend() does for it. The C++ call takes the caller's mask as it is (broadcast
        # through its strides) and empty sequences (o = 0, lse -inf), and picks its query tile itself.
        eager = _eager_ops.get(_build._forced or _build._from_env) or _eager_forward()
        o, lse = eager(q, k, v, attn_mask, causal, scale, *CPU_FWD_BLOCKS)  # o in q's dtype
        return (o, lse) if return_lse else o
    return attend(CPP if q.is_cpu else TRITON, q, k, v, causal=causal, scale=scale, attn_mask=attn_mask,
                  return_lse=return_lse)


def bind(*, causal: bool, scale: float, attn_mask: torch.Tensor | None, return_lse: bool) -> Any:
    """``attention`` with these attributes bound, for the dispatcher's warm calls: the common CPU call
    goes straight to the C++ eager forward (right after a large call, each Python step skipped is worth
    several times its warm cost), anything else to ``attention``."""

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
        if q.is_cpu and not (_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            eager = _eager_ops.get(_build._forced or _build._from_env) or _eager_forward()
            o, lse = eager(q, k, v, attn_mask, causal, scale, *CPU_FWD_BLOCKS)
            return (o, lse) if return_lse else o
        return attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, return_lse=return_lse)

    return call


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
           attn_mask: torch.Tensor | None, return_lse: bool) -> list[str]:
    reasons = []
    if q.device.type == "cpu":
        if q.dtype not in CPU_DTYPES:
            allowed = [dtype_name(d) for d in CPU_DTYPES]
            reasons.append(f"dtype {dtype_name(q.dtype)} on the CPU: its C++ kernels take {allowed}")
        reason = _build.unavailable_reason(OP)
        if reason:
            reasons.append(reason)
    elif q.device.type == "cuda":
        if q.dtype not in CUDA_DTYPES:
            allowed = [dtype_name(d) for d in CUDA_DTYPES]
            reasons.append(f"dtype {dtype_name(q.dtype)} on CUDA: its Triton kernels take {allowed}")
        if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM_CUDA:
            reasons.append(f"head dim {max(q.shape[3], v.shape[3])} on CUDA: its Triton kernels take at most "
                           f"{MAX_HEAD_DIM_CUDA}")
        reason = _build.triton_reason()
        if reason:
            reasons.append(reason)
    return reasons


# -- SDPA behind a C++ finite check ----------------------------------------------------------------------

_finite_ops: dict[str, Any] = {}  # a level -> its attention_all_finite, as _eager_ops


def finite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k and v hold only finite values: one C++ pass over their bits, on one thread (three
    [1, 8, 64, 64] bfloat16 tensors: about 2 us, where torch's three sums take 17 us on two threads), or the
    sums where it does not read the tensors (not 4-D, last dimension strided, float64)."""
    check = _finite_ops.get(_build._forced or _build._from_env) or _pybind(_finite_ops, "attention_all_finite")
    got = check(q, k, v)
    return torch_finite(q, k, v) if got < 0 else got == 1


_sdpa_behind_finite = sdpa_behind(finite)


def bind_sdpa(*, causal: bool, scale: float, attn_mask: torch.Tensor | None, return_lse: bool) -> Any:
    """``fused-sdpa`` with these attributes bound (the dispatcher's warm calls): an unmasked call whose
    only masked positions are SDPA's own (none, or the top-left causal triangle) goes from the C++ check
    straight to SDPA; anything else takes the kernel's general path."""
    if attn_mask is not None or return_lse:
        return None

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
        Lq, Lk = q.shape[2], k.shape[2]
        if not causal or Lq == Lk or Lq == 1:
            check = _finite_ops.get(_build._forced or _build._from_env) or _pybind(_finite_ops, "attention_all_finite")
            if check(q, k, v) == 1:
                return _sdpa(q, k, v, is_causal=causal and Lq > 1, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        return _sdpa_behind_finite(q, k, v, causal=causal, scale=scale, attn_mask=None, return_lse=False)

    return call


def _sdpa_cpu_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                    attn_mask: torch.Tensor | None, return_lse: bool) -> list[str]:
    reasons = _sdpa_check(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, return_lse=return_lse)
    reason = _build.unavailable_reason(OP)
    return reasons + [reason] if reason else reasons


# -- bfloat16 products on the AMX tiles, or through MKL's gemm_bf16bf16f32 --------------------------------

# CPU flags under which the bfloat16 products run natively: the C++ kernels' own AMX tile products, or MKL's
# (AMX tiles, or AVX512_BF16 dot products); elsewhere MKL widens, and this kernel could not beat the fused one.
BF16_GEMM_FLAGS = ("amx_bf16", "avx512_bf16")
_gemm16_ops: dict[str, Any] = {}  # a level -> its attention_fwd_eager_gemm16, as _eager_ops
# The prefill tiles of the bfloat16 products: 64 query rows (four tiles) against 128 keys. On the AMX tiles
# (Xeon, C++ calls against SDPA, bfloat16 L=64-1024) these beat 128 x 128 on five of seven shapes, by up to
# 20% (causal L=128: 0.83x SDPA's time against 1.04x), and lost 3% on one (non-causal L=256).
GEMM16_BLOCKS = (64, 128)


def bf16_gemm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
              attn_mask: torch.Tensor | None, return_lse: bool) -> Any:
    """The fused C++ kernels with bfloat16 products (forward only): q . k^T from the bfloat16 operands with
    float32 sums, the softmax weights rounded to bfloat16 (as SDPA's CPU kernels do) for their product with
    v, the online softmax and the non-finite rules as in ``fused``. The products run on the AMX tiles
    where the CPU and the OS allow it (the avx512 build), else through MKL's gemm_bf16bf16f32. On the
    tiles, a decode task of 2-16 query rows takes its scores as k . q^T (each key block read in place);
    one query row's products, and other scores of fewer than 8 rows, still go through MKL."""
    o, lse = _gemm16_eager()(q, k, v, attn_mask, causal, scale, *GEMM16_BLOCKS)
    return (o, lse) if return_lse else o


def _gemm16_eager() -> Any:
    """The level in force's attention_fwd_eager_gemm16 (built or loaded at first use)."""
    return _gemm16_ops.get(_build._forced or _build._from_env) or _pybind(_gemm16_ops, "attention_fwd_eager_gemm16")


def bind_bf16_gemm(*, causal: bool, scale: float, attn_mask: torch.Tensor | None, return_lse: bool) -> Any:
    """``bf16_gemm`` with these attributes bound, for the dispatcher's warm calls."""

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
        o, lse = _gemm16_eager()(q, k, v, attn_mask, causal, scale, *GEMM16_BLOCKS)
        return (o, lse) if return_lse else o

    return call


def _bf16_gemm_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                     attn_mask: torch.Tensor | None, return_lse: bool) -> list[str]:
    reason = _build.unavailable_reason(OP)
    if reason:
        return [reason]
    if not any(flag in _build.cpu_flags() for flag in BF16_GEMM_FLAGS):
        return [f"this CPU has none of {list(BF16_GEMM_FLAGS)}: MKL's bfloat16 product would widen its operands"]
    mod = _build.module(OP)
    held = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").strip().upper()
    if held and not held.startswith("AVX512") and not mod.attention_gemm16_amx():
        return [f"MKL_ENABLE_INSTRUCTIONS={held} holds MKL below its bfloat16 kernels, and this build or "
                "process has no AMX tiles of its own"]
    if not mod.attention_has_gemm16():
        return ["this process has neither AMX tiles nor an MKL that exports gemm_bf16bf16f32"]
    (B, Hq, Lq, D), (Hkv, Lk, Dv) = q.shape, (k.shape[1], k.shape[2], v.shape[3])
    if mod.attention_path(B, Hq, Hkv, Lq, Lk, D, Dv, q.dtype == torch.float32) == 0:
        return ["a call this small takes the fused kernel's row path (no products): it would be fused again"]
    return []


KERNELS = [
    Kernel(op=OP, backend="fused", fn=attention, devices={"cpu", "cuda"}, dtypes={*CPU_DTYPES, *CUDA_DTYPES},
           priority=30, check=_check, differentiable=True, bind=bind,
           description="FlashAttention-2 tiles with an online softmax: C++ (OpenMP, BLAS tile products) on the "
                       "CPU, Triton on CUDA; backward recomputes the scores from the saved lse"),
    # Where SDPA itself is the fastest kernel (on a CPU with AMX, bfloat16 prefill: about half our tiles'
    # time), what it costs beside SDPA is the finite check that the contract needs in front of it.
    # float64 is left to torch-sdpa: the C++ check does not read it, so this kernel would be that one again.
    Kernel(op=OP, backend="fused-sdpa", fn=_sdpa_behind_finite, devices={"cpu"}, dtypes=set(CPU_DTYPES),
           priority=25, check=_sdpa_cpu_check, differentiable=True, bind=bind_sdpa,
           description="torch-sdpa with its finite check of q, k and v in one C++ pass over their bits"),
    # bfloat16 on a CPU that multiplies bfloat16 natively: GQA decode (B=1, Hq=32, Hkv=8, Lq=8, Lk=128,
    # D=128) in 0.67x SDPA's time where fused takes 1.13x; prefill L=64-512 at 0.76-1.05x SDPA's time on
    # the AMX tiles (Xeon with AMX). Its products are not the float32 call's bit for bit, as fused's are.
    Kernel(op=OP, backend="fused-bf16gemm", fn=bf16_gemm, devices={"cpu"}, dtypes={torch.bfloat16}, priority=22,
           check=_bf16_gemm_check, bind=bind_bf16_gemm,
           description="the fused C++ kernels with bfloat16 products on the AMX tiles (else MKL's "
                       "gemm_bf16bf16f32), the weights rounded to bfloat16 for their product with v, as SDPA's"),
]
