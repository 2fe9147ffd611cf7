"""The acme backend: attention computed over key blocks with an online softmax (no [Lq, Lk] matrix).

Registered through the ``switchyard`` entry point group; Switchyard validates it against its
reference before ever choosing it.
"""
from __future__ import annotations

import torch

from registry import Kernel, hookimpl

BLOCK = 64


def acme_attention(q, k, v, *, causal, scale, attn_mask, return_lse):
    """Online softmax over blocks of BLOCK keys (Milakov & Gimelshein 2018; FlashAttention's forward)."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv
    k = k.repeat_interleave(group, 1).float()
    v = v.repeat_interleave(group, 1).float()
    qf = q.float()
    m = torch.full((B, Hq, Lq, 1), float("-inf"))
    l = torch.zeros(B, Hq, Lq, 1)
    acc = torch.zeros(B, Hq, Lq, Dv)
    rows = torch.arange(Lq)[:, None]
    for start in range(0, Lk, BLOCK):
        cols = torch.arange(start, min(start + BLOCK, Lk))[None, :]
        allowed = torch.ones(Lq, cols.shape[1], dtype=torch.bool)
        if causal:
            allowed = cols <= rows + (Lk - Lq)
        if attn_mask is not None:
            allowed = allowed & attn_mask[..., start:start + BLOCK]
        allowed = allowed.expand(B, Hq, Lq, cols.shape[1])
        s = torch.where(allowed, qf @ k[:, :, start:start + BLOCK].transpose(-1, -2) * scale, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.where(allowed, torch.exp(s - safe), torch.zeros_like(s))
        alpha = torch.where(torch.isfinite(m), torch.exp(m - safe), torch.zeros_like(m))
        vb = v[:, :, start:start + BLOCK]
        # A key no query may attend contributes nothing, even when its value is NaN.
        unused = ~allowed.any(-2, keepdim=True).transpose(-1, -2)
        vb = torch.where(unused, torch.zeros_like(vb), vb)
        acc = acc * alpha + p @ vb
        l = l * alpha + p.sum(-1, keepdim=True)
        m = m_new
    out = torch.where(l > 0, acc / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(acc)).to(q.dtype)
    if return_lse:
        lse = torch.where(l[..., 0] > 0, m[..., 0] + torch.log(torch.where(l > 0, l, torch.ones_like(l))[..., 0]),
                          torch.full_like(l[..., 0], float("-inf")))
        return out, lse.float()
    return out


@hookimpl
def switchyard_kernels():
    return [Kernel(op="attention", backend="acme", fn=acme_attention, devices={"cpu"}, dtypes={torch.float32},
                   priority=10, description="blocked online-softmax attention in torch")]
