"""Attention in torch: the explicit matmul/softmax math, and PyTorch's own SDPA behind our semantics."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from core.ops.attention import allowed_positions, plain_math
from registry import Kernel


def _grouped(q: torch.Tensor, Hkv: int) -> torch.Tensor:
    """View q [B, Hq, Lq, D] as [B, Hkv, group, Lq, D] so GQA needs no copy of k and v."""
    B, Hq, Lq, D = q.shape
    return q.reshape(B, Hkv, Hq // Hkv, Lq, D)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
          attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not (bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all())):
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
    if bool(dead.any()):
        p = p.masked_fill(dead[..., None], 0.0)
    o = p @ v.unsqueeze(2)
    return o.reshape(B, Hq, Lq, v.shape[3]), lse.reshape(B, Hq, Lq)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
              attn_mask: torch.Tensor | None, return_lse: bool) -> Any:
    """Explicit matmul, masked softmax, matmul; differentiable through autograd."""
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


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
         attn_mask: torch.Tensor | None, return_lse: bool) -> Any:
    """torch.nn.functional.scaled_dot_product_attention, given the mask that yields our semantics.

    SDPA's ``is_causal`` is top-left aligned, so it is used only when that agrees (Lq == Lk, no mask);
    otherwise the bottom-right causal mask AND the caller's mask is passed explicitly. Rows that may
    attend nothing are opened to every key for SDPA (so it never divides by zero) and zeroed after.
    """
    Lq, Lk = q.shape[2], k.shape[2]
    if not all(bool(torch.isfinite(t).all()) for t in (q, k, v)):  # SDPA's CPU kernels differ on these
        return attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, return_lse=False)
    gqa = k.shape[1] != q.shape[1]
    if attn_mask is None and (not causal or Lq == Lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Lq > 1, scale=scale, enable_gqa=gqa)
    allowed = allowed_positions(Lq, Lk, causal, attn_mask, q.device)
    dead = ~allowed.any(-1, keepdim=True)
    if bool(dead.any()):
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | dead, scale=scale, enable_gqa=gqa)
        return o.masked_fill(dead, 0.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)


_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}

KERNELS = [
    Kernel(op="attention", backend="torch", fn=attention, devices={"cpu", "cuda"}, dtypes=_DTYPES, priority=10,
           differentiable=True, description="explicit matmul / masked softmax / matmul, GQA by a grouped view"),
    Kernel(op="attention", backend="torch-sdpa", fn=sdpa, devices={"cpu", "cuda"}, dtypes=_DTYPES, priority=20,
           check=_sdpa_check, differentiable=True,
           description="torch.nn.functional.scaled_dot_product_attention with an explicit bottom-right mask"),
]
