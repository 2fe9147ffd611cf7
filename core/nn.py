"""Module forms of the ops that carry state: thin ``torch.nn.Module``s over the dispatcher's functions.

Each works with ``state_dict``/``load_state_dict``, ``.to()``, ``train()``/``eval()`` and under
``torch.compile`` (the dispatcher's calls become the custom ops of ``core.library`` there).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core import dispatcher
from core.errors import InvalidInput, invalid
from core.ops.nearest_neighbor import KnnResult
from core.ops.precision_cast import FORMATS, SOURCES, amax_scale, compute_dtype


class Attention(nn.Module):
    """Multi-head attention with GQA over ``dispatcher.attention``: q/k/v/out projections and a kv cache.

    ``forward(x [B, L, E], attn_mask=None, kv_cache=None)`` returns ``(out [B, L, E], (k, v))``, the
    keys and values ``[B, num_kv_heads, Lk, E / num_heads]`` including the cache's, to pass back as
    ``kv_cache`` on the next step. The causal mask is bottom-right aligned, so a step of one token
    (or a few) against the cache attends exactly what the full sequence's last rows attend.
    ``attn_mask`` (bool, True = may attend) is broadcast to ``[B, num_heads, L, Lk]``.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, *, causal: bool = False,
                 bias: bool = False, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise invalid("Attention", name, "an int >= 1", repr(value))
        if embed_dim % num_heads:
            raise invalid("Attention", "num_heads", f"a divisor of embed_dim={embed_dim}", repr(num_heads))
        if num_heads % num_kv_heads:
            raise invalid("Attention", "num_kv_heads", f"a divisor of num_heads={num_heads}", repr(num_kv_heads))
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal = causal
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, **kw)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise invalid("Attention", "x", f"a tensor [B, L, {self.embed_dim}]", f"shape {tuple(x.shape)}")
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
        o = dispatcher.attention(q, k, v, causal=self.causal, attn_mask=attn_mask)
        out = self.out_proj(o.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))
        return out, (k, v)


class DelayedScalingCast(nn.Module):
    """Transformer Engine's delayed-scaling recipe over ``dispatcher.precision_cast``.

    The cast uses the scale held in the ``scale`` buffer, computed from earlier calls' amaxes:
    ``scale = max_finite(dtype) / amax / 2**margin`` where ``amax`` is the largest value of the
    ``amax_history`` buffer (``amax_compute_algo="max"``) or its most recent entry (``"most_recent"``);
    where that amax is 0 or not finite the scale stays as it was (TE's ``_default_sf_compute``), and an
    infinite quotient is the float32 max. In training mode every call records ``amax(|x|)`` over the
    finite elements of its input as the history's newest entry (``amax_history[0]``; the oldest of the
    ``amax_history_len`` entries drops out) and then updates the scale for the next call; in eval mode
    history and scale are frozen. Returns ``(y, scale)``: the cast of ``x * scale`` (computed in float32,
    float64 for a float64 ``x``, as ``precision_cast`` does) and the scale it was cast with (dequantize
    with ``y.float() / scale``).
    """

    def __init__(self, dtype: torch.dtype, *, margin: int = 0, amax_history_len: int = 16,
                 amax_compute_algo: str = "max", saturate: bool = True, rounding: str = "nearest") -> None:
        super().__init__()
        if dtype not in FORMATS:
            raise invalid("DelayedScalingCast", "dtype", f"one of {[str(d) for d in FORMATS]}", repr(dtype))
        if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= 127:
            raise invalid("DelayedScalingCast", "margin", "an int in [0, 127]", repr(margin))
        if isinstance(amax_history_len, bool) or not isinstance(amax_history_len, int) or amax_history_len < 1:
            raise invalid("DelayedScalingCast", "amax_history_len", "an int >= 1", repr(amax_history_len))
        if amax_compute_algo not in ("max", "most_recent"):
            raise invalid("DelayedScalingCast", "amax_compute_algo", "'max' or 'most_recent'", repr(amax_compute_algo))
        if not isinstance(saturate, bool):
            raise invalid("DelayedScalingCast", "saturate", "a bool", repr(saturate))
        self.dtype, self.margin, self.amax_compute_algo = dtype, margin, amax_compute_algo
        self.saturate, self.rounding = saturate, rounding
        self.register_buffer("amax_history", torch.zeros(amax_history_len, dtype=torch.float32))
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dtype not in SOURCES:
            raise invalid("DelayedScalingCast", "x", f"a tensor of dtype one of {[str(d) for d in SOURCES]}",
                          getattr(x, "dtype", type(x).__name__))
        scale = self.scale.clone()
        v = x.to(compute_dtype(x.dtype)) * scale.to(compute_dtype(x.dtype))
        y = dispatcher.precision_cast(v, dtype=self.dtype, saturate=self.saturate, rounding=self.rounding).y
        if self.training:
            self._update(x)
        return y, scale

    def _update(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            mag = x.detach().abs()
            mag = torch.where(torch.isfinite(mag), mag, torch.zeros_like(mag)).reshape(-1)
            amax = torch.cat([mag.float(), mag.new_zeros(1, dtype=torch.float32)]).amax()
            history = torch.cat([amax.reshape(1), self.amax_history[:-1]])
            self.amax_history.copy_(history)
            window = history.amax() if self.amax_compute_algo == "max" else history[0]
            usable = (window > 0) & torch.isfinite(window)
            self.scale.copy_(torch.where(usable, amax_scale(window, self.dtype, self.margin), self.scale))

    def extra_repr(self) -> str:
        return (f"dtype={self.dtype}, margin={self.margin}, amax_history_len={self.amax_history.numel()}, "
                f"amax_compute_algo={self.amax_compute_algo!r}, saturate={self.saturate}")


class KNNIndex(nn.Module):
    """An exact k-nearest-neighbour index over ``dispatcher.nearest_neighbor``, the database a buffer.

    ``add(x [n, dim])`` appends points (indices continue from the points already there), ``search(
    queries [m, dim], k)`` returns ``KnnResult(distances, indices)`` (``forward`` is ``search``),
    ``reset()`` empties it. The database travels with ``state_dict`` (any number of rows loads into any
    index of the same ``dim``) and ``.to()``; its dtype is float32 unless moved.
    """

    def __init__(self, dim: int, *, metric: str = "l2", device: Any = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise invalid("KNNIndex", "dim", "an int >= 1", repr(dim))
        if metric not in ("l2", "ip"):
            raise invalid("KNNIndex", "metric", "'l2' or 'ip'", repr(metric))
        self.dim, self.metric = dim, metric
        self.register_buffer("database", torch.empty(0, dim, device=device, dtype=dtype))

    @property
    def ntotal(self) -> int:
        return int(self.database.shape[0])

    def add(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            raise invalid("KNNIndex.add", "x", f"a tensor [n, {self.dim}]",
                          f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
        if not x.dtype.is_floating_point:
            raise invalid("KNNIndex.add", "x", "a floating tensor", f"dtype {x.dtype}")
        self.database = torch.cat([self.database, x.detach().to(self.database)])

    def search(self, queries: torch.Tensor, k: int) -> KnnResult:
        if self.database.shape[0] == 0:
            raise InvalidInput("KNNIndex.search: argument 'k': expected an index holding points (add some first), "
                               "got an empty index")
        if isinstance(queries, torch.Tensor) and queries.dtype != self.database.dtype and queries.dtype.is_floating_point:
            queries = queries.to(self.database.dtype)
        return dispatcher.nearest_neighbor(queries, self.database, k=k, metric=self.metric)

    def forward(self, queries: torch.Tensor, k: int) -> KnnResult:
        return self.search(queries, k)

    def reset(self) -> None:
        self.database = self.database.new_empty(0, self.dim)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "database")
        if isinstance(saved, torch.Tensor) and saved.dim() == 2 and saved.shape[1] == self.dim:
            self.database = self.database.new_empty(saved.shape)  # any row count loads
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, metric={self.metric!r}, ntotal={self.ntotal}"
