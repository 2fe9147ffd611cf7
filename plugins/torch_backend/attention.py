"""Attention in torch: the explicit matmul/softmax math, and PyTorch's own SDPA behind our semantics.

Non-finite inputs (the contract: a key or value no query may attend has no influence, attended ones
follow IEEE arithmetic, a row that attends nothing gets 0) cost the common, finite case one reduction
at most, never an ``isfinite(t).all()`` pass that allocates a bool tensor per input:

- The plain math is IEEE arithmetic itself. Where no position is masked (no ``attn_mask``, and not
  causal or ``Lq == 1``) it runs with nothing before it and sums its output after: NaN and inf reach
  the output through the products (a NaN or +inf score makes its row NaN, an inf or NaN value every row
  of its head, a row of only -inf scores is 0/0), so a finite output is the contract's answer, and a
  non-finite one is recomputed by the exact path (the op's ``plain_math``, which zeroes dead rows).
  Where positions are masked, a non-finite key or value there would reach the products (0 * NaN), so
  one sum per input decides first.
- SDPA's CPU kernels do not follow IEEE arithmetic on non-finite inputs even where nothing is masked
  (their running max drops NaN: a NaN query row comes out 0 at short key lengths, a block of NaN keys
  is skipped; in float16 and bfloat16 inf keys and queries give finite rows), and the output is then
  finite, so nothing after the call could tell. ``sdpa`` therefore sums q, k and v before calling it:
  a NaN or inf anywhere makes the sum non-finite (a sum that overflows from finite values only sends
  the call to the exact path).

On CUDA a host read of a device value (``.item()``, ``bool(t)``) is a synchronization, and it rules out
CUDA graphs, so there (``_sync_free``) no answer is read back where the device can decide itself:

- unmasked plain math: no check at all. The output's only departure from the exact path is a row whose
  scores are all -inf (0/0 in the softmax, 0 in the contract), and that row is zeroed on the device
  (its score maximum is -inf); every other non-finite input already gets IEEE's answer from the products;
- rows that attend nothing are zeroed unconditionally, not after asking whether there are any;
- one synchronization stays where positions are masked (the plain math's masked keys and values, and
  SDPA, whose kernels are not IEEE on non-finite inputs): the finite check's sum. An exact answer
  chosen on the device would need the exact path computed on every call (for masked values, an
  [Lq, Lk, D] product or four more matmuls with p), a tax far above one synchronization. The fused
  Triton kernel needs none: its tiles detect non-finite values themselves.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from core.ops.attention import allowed_positions, plain_math
from registry import Kernel

_sdpa = F.scaled_dot_product_attention


def _finite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k and v hold only finite values: one allocation-free sum each (float16 accumulates
    and returns float32, so a long sum of ordinary values does not overflow to a false alarm)."""
    if q.dtype is torch.float16:
        f32 = torch.float32
        return math.isfinite((q.sum(dtype=f32) + k.sum(dtype=f32) + v.sum(dtype=f32)).item())
    if not _sync_free(q):  # three scalars are cheaper to read than to add as tensors
        return math.isfinite(q.sum().item() + k.sum().item() + v.sum().item())
    return math.isfinite((q.sum() + k.sum() + v.sum()).item())  # one host synchronization, not three


def _sync_free(t: torch.Tensor) -> bool:
    """Whether the host must not read values of ``t`` back (CUDA: each read is a synchronization)."""
    return t.is_cuda


def _output_finite(o: torch.Tensor) -> bool:
    return math.isfinite((o.sum(dtype=torch.float32) if o.dtype is torch.float16 else o.sum()).item())


def _grouped(q: torch.Tensor, Hkv: int) -> torch.Tensor:
    """View q [B, Hq, Lq, D] as [B, Hkv, group, Lq, D] so GQA needs no copy of k and v."""
    B, Hq, Lq, D = q.shape
    return q.reshape(B, Hkv, Hq // Hkv, Lq, D)


def _unmasked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every query attends every key: each group of query heads is one row block of its k/v head's
    matmul ([B, Hkv, group * Lq, D]); the output is checked by the caller."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    s = q.reshape(B, Hkv, (Hq // Hkv) * Lq, D) @ k.transpose(-1, -2)
    if scale != 1.0:
        s = s.mul_(scale)
    o = torch.softmax(s, dim=-1) @ v
    if _sync_free(q):  # the device zeroes rows whose scores are all -inf (softmax's 0/0): no check after
        o = o.masked_fill(torch.isneginf(s.amax(dim=-1, keepdim=True)), 0.0)
    o = o.reshape(B, Hq, Lq, v.shape[3])
    return o, (torch.logsumexp(s.float(), dim=-1).reshape(B, Hq, Lq) if lse else None)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
          attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not _finite(q, k, v):
        # Exact masking: every key and value is selected per (query, key) before any product, so a
        # non-finite one at a masked position reaches nothing (the op's plain math, [Lq, Lk, D] temporaries).
        return plain_math(q, k, v, causal, scale, attn_mask)
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    allowed = allowed_positions(Lq, Lk, causal, attn_mask, q.device)
    g = _grouped(q, Hkv)
    s = (g @ k.unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, group, Lq, Lk]
    allowed5 = allowed.expand(B, Hq, Lq, Lk).reshape(B, Hkv, Hq // Hkv, Lq, Lk) if allowed.dim() == 4 else allowed
    s = s.masked_fill(~allowed5, float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)
    dead = torch.isneginf(lse)
    p = torch.softmax(s, dim=-1)
    if _sync_free(q) or bool(dead.any()):
        p = p.masked_fill(dead[..., None], 0.0)
    o = p @ v.unsqueeze(2)
    return o.reshape(B, Hq, Lq, v.shape[3]), lse.reshape(B, Hq, Lq)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
              attn_mask: torch.Tensor | None, return_lse: bool) -> Any:
    """Explicit matmul, masked softmax, matmul; differentiable through autograd."""
    if attn_mask is None and (not causal or q.shape[2] == 1) and q.numel() and k.shape[2]:
        o, lse = _unmasked(q, k, v, scale, return_lse)
        if _sync_free(q) or _output_finite(o):  # on the device, _unmasked zeroed the dead rows itself
            return (o, lse.float()) if return_lse else o
        o, lse = plain_math(q, k, v, causal, scale, None)
    else:
        o, lse = _math(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask)
    o = o.to(q.dtype)
    return (o, lse.float()) if return_lse else o


def _sdpa_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                attn_mask: torch.Tensor | None, return_lse: bool) -> list[str]:
    reasons = []
    if return_lse:
        reasons.append("return_lse=True: scaled_dot_product_attention does not return the log-sum-exp")
    if k.shape[2] == 0 or q.shape[2] == 0:
        reasons.append("an empty sequence (Lq or Lk is 0)")
    return reasons


def sdpa_behind(finite: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]) -> Callable[..., Any]:
    """``sdpa`` with ``finite(q, k, v)`` as its check that q, k and v hold only finite values (the fused
    backend's ``fused-sdpa`` passes a one-pass C++ check)."""

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
             attn_mask: torch.Tensor | None, return_lse: bool) -> Any:
        """torch.nn.functional.scaled_dot_product_attention, given the mask that yields our semantics.

        With no mask and nothing or only the top-left causal triangle masked (not causal, ``Lq == 1``, or
        ``Lq == Lk``), finite inputs go to SDPA as they are. Otherwise SDPA's ``is_causal`` (top-left
        aligned) disagrees with ours, so the bottom-right causal mask AND the caller's mask is passed
        explicitly; rows that may attend nothing are opened to every key for SDPA (so it never divides by
        zero) and zeroed after.
        """
        if not finite(q, k, v):  # SDPA's CPU kernels differ on these (module docstring)
            return attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, return_lse=False)
        Lq, Lk = q.shape[2], k.shape[2]
        gqa = k.shape[1] != q.shape[1]
        if attn_mask is None and (not causal or Lq == Lk or Lq == 1):
            return _sdpa(q, k, v, is_causal=causal and Lq > 1, scale=scale, enable_gqa=gqa)
        allowed = allowed_positions(Lq, Lk, causal, attn_mask, q.device)
        dead = ~allowed.any(-1, keepdim=True)
        if _sync_free(q) or bool(dead.any()):
            o = _sdpa(q, k, v, attn_mask=allowed | dead, scale=scale, enable_gqa=gqa)
            return o.masked_fill(dead, 0.0)
        return _sdpa(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)

    return sdpa


sdpa = sdpa_behind(_finite)


_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}

KERNELS = [
    Kernel(op="attention", backend="torch", fn=attention, devices={"cpu", "cuda"}, dtypes=_DTYPES, priority=10,
           differentiable=True, description="explicit matmul / masked softmax / matmul, GQA by a grouped view"),
    Kernel(op="attention", backend="torch-sdpa", fn=sdpa, devices={"cpu", "cuda"}, dtypes=_DTYPES, priority=20,
           check=_sdpa_check, differentiable=True,
           description="torch.nn.functional.scaled_dot_product_attention with an explicit bottom-right mask"),
]
