"""Reference attention: float64 numpy, one (batch, head) at a time, written to be obviously right."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from registry import Kernel


def _mask4(attn_mask: torch.Tensor | None, full: tuple[int, int, int, int]) -> np.ndarray | None:
    if attn_mask is None:
        return None
    m = attn_mask.cpu().numpy()
    return np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape), full)


def _allowed(Lq: int, Lk: int, causal: bool, mask: np.ndarray | None) -> np.ndarray:
    """Where query i may attend key j: bottom-right causal, AND the caller's mask for this head."""
    i = np.arange(Lq)[:, None]
    j = np.arange(Lk)[None, :]
    allowed = (j <= i + (Lk - Lq)) if causal else np.ones((Lq, Lk), dtype=bool)
    return allowed if mask is None else allowed & mask


def _head(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(o, lse, p) for one head. A masked position contributes nothing, even a NaN. At an attended one,
    inf and NaN follow IEEE arithmetic as in the plain math (SDPA's math backend): a NaN or +inf score
    makes its row NaN (lse NaN or +inf), a -inf score is a weight of 0, and an inf or NaN value reaches
    the output. A row with no attended key, or only -inf scores, gets 0 and lse -inf."""
    with np.errstate(invalid="ignore"):  # inf * 0 in a score
        s = np.where(allowed, (q @ k.T) * scale, -np.inf)
    m = s.max(axis=1, initial=-np.inf, keepdims=True)  # NaN when a score is NaN
    dead = m == -np.inf
    with np.errstate(invalid="ignore", divide="ignore"):  # inf - inf, 0 * inf (poisoned rows), log(0) (dead)
        e = np.where(allowed, np.exp(s - np.where(dead, 0.0, m)), 0.0)
        total = e.sum(axis=1, keepdims=True)
        p = np.where(dead, 0.0, e / np.where(dead, 1.0, total))
        o = np.where(allowed[:, :, None], p[:, :, None] * v[None, :, :], 0.0).sum(axis=1)
        lse = np.where(dead[:, 0], -np.inf, np.where(m[:, 0] == np.inf, np.inf, m[:, 0] + np.log(total[:, 0])))
    return o, lse, p


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
              attn_mask: torch.Tensor | None, return_lse: bool) -> Any:
    """softmax(scale * q k^T) v per head, with the op's masking rules, in float64."""
    Q, K, V = _numpy(q), _numpy(k), _numpy(v)
    B, Hq, Lq, _ = Q.shape
    Hkv, Lk, Dv = K.shape[1], K.shape[2], V.shape[3]
    mask = _mask4(attn_mask, (B, Hq, Lq, Lk))
    group = Hq // Hkv
    O = np.zeros((B, Hq, Lq, Dv))
    LSE = np.full((B, Hq, Lq), -np.inf)
    for b in range(B):
        for h in range(Hq):
            allowed = _allowed(Lq, Lk, causal, None if mask is None else mask[b, h])
            O[b, h], LSE[b, h], _ = _head(Q[b, h], K[b, h // group], V[b, h // group], allowed, scale)
    o = torch.from_numpy(O).to(device=q.device, dtype=q.dtype)
    if return_lse:
        return o, torch.from_numpy(LSE).to(device=q.device, dtype=torch.float32)
    return o


def attention_backward(args: Sequence[torch.Tensor], attrs: dict[str, Any], grad_outputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """The gradient oracle: (dq, dk, dv) in float64 for cotangents of o (and of lse, when given)."""
    q, k, v = args
    Q, K, V = _numpy(q), _numpy(k), _numpy(v)
    dO = _numpy(grad_outputs[0])
    dL = _numpy(grad_outputs[1]) if len(grad_outputs) > 1 and grad_outputs[1] is not None else None
    scale = attrs["scale"]
    B, Hq, Lq, _ = Q.shape
    Hkv, Lk = K.shape[1], K.shape[2]
    mask = _mask4(attrs["attn_mask"], (B, Hq, Lq, Lk))
    group = Hq // Hkv
    dQ, dK, dV = np.zeros_like(Q), np.zeros_like(K), np.zeros_like(V)
    for b in range(B):
        for h in range(Hq):
            kv = h // group
            allowed = _allowed(Lq, Lk, attrs["causal"], None if mask is None else mask[b, h])
            o, _, p = _head(Q[b, h], K[b, kv], V[b, kv], allowed, scale)
            Vc = np.where(np.isfinite(V[b, kv]), V[b, kv], 0.0)
            dV[b, kv] += p.T @ dO[b, h]
            dp = np.where(allowed, dO[b, h] @ Vc.T, 0.0)
            ds = p * (dp - (dO[b, h] * o).sum(axis=1, keepdims=True))
            if dL is not None:
                ds = ds + p * dL[b, h][:, None]
            Kc = np.where(np.isfinite(K[b, kv]), K[b, kv], 0.0)
            dQ[b, h] = scale * ds @ Kc
            dK[b, kv] += scale * ds.T @ Q[b, h]
    return tuple(torch.from_numpy(a) for a in (dQ, dK, dV))


KERNELS = [
    Kernel(op="attention", backend="reference", fn=attention, devices={"cpu", "cuda"}, priority=-100,
           differentiable=False, backward=attention_backward,
           description="float64 numpy, one head at a time: the executable definition"),
]
