"""Misbehaving attention kernels, each fast enough that it would win if it were not validated."""
from __future__ import annotations

import torch

from plugins.torch_backend.attention import attention as good_attention
from registry import Kernel, hookimpl

MARKER = 12345.0


def wrong_values(q, k, v, *, causal, scale, attn_mask, return_lse):
    o = torch.zeros(*q.shape[:3], v.shape[3], dtype=q.dtype)
    return (o, torch.zeros(q.shape[:3])) if return_lse else o


def raises(q, k, v, *, causal, scale, attn_mask, return_lse):
    raise RuntimeError("this kernel always raises")


def wrong_shape(q, k, v, *, causal, scale, attn_mask, return_lse):
    return torch.zeros(1, dtype=q.dtype)


def returns_nan(q, k, v, *, causal, scale, attn_mask, return_lse):
    out = good_attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, return_lse=return_lse)
    o = out[0] if return_lse else out
    o = o.clone()
    o.view(-1)[0] = float("nan")
    return (o, out[1]) if return_lse else o


def slightly_wrong(q, k, v, *, causal, scale, attn_mask, return_lse):
    out = good_attention(q, k, v, causal=causal, scale=scale * 1.01, attn_mask=attn_mask, return_lse=return_lse)
    return out


def raises_on_marker(q, k, v, *, causal, scale, attn_mask, return_lse):
    """Right on every input except the caller's data carrying MARKER: passes validation and timing."""
    if bool((q == MARKER).any()):
        raise RuntimeError("marker seen: failing on the caller's data")
    return good_attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, return_lse=return_lse)


def wrong_gradient(q, k, v, *, causal, scale, attn_mask, return_lse):
    """Right forward values, but the gradient only flows to v (q and k are detached)."""
    return good_attention(q.detach(), k.detach(), v, causal=causal, scale=scale, attn_mask=attn_mask, return_lse=return_lse)


def _k(backend, fn, **kw):
    return Kernel(op="attention", backend=backend, fn=fn, devices={"cpu"}, dtypes={torch.float32}, priority=100, **kw)


class BadPlugin:
    """Wrong values, raising, wrong shape, NaN and a 1% error: none may ever be chosen."""

    @hookimpl
    def switchyard_kernels(self):
        return [_k("bad-values", wrong_values), _k("bad-raises", raises), _k("bad-shape", wrong_shape),
                _k("bad-nan", returns_nan), _k("bad-scale", slightly_wrong)]


class MarkerPlugin:
    @hookimpl
    def switchyard_kernels(self):
        return [_k("marker", raises_on_marker, differentiable=True)]


class WrongGradPlugin:
    @hookimpl
    def switchyard_kernels(self):
        return [_k("wrong-grad", wrong_gradient, differentiable=True)]


class RaisingHookPlugin:
    @hookimpl
    def switchyard_kernels(self):
        raise RuntimeError("the hook itself raised")


class MisspelledHookPlugin:
    @hookimpl
    def switchyard_kernel(self):  # missing the final "s": pluggy's check_pending catches it
        return []


class UnknownOpPlugin:
    @hookimpl
    def switchyard_kernels(self):
        return [Kernel(op="no_such_op", backend="x", fn=wrong_values)]


class BadSignaturePlugin:
    @hookimpl
    def switchyard_kernels(self):
        return [Kernel(op="attention", backend="badsig", fn=lambda q, k: q)]


def raises_when_large(q, k, v, *, causal, scale, attn_mask, return_lse):
    """Right on the small validation sample, raises at the caller's (larger) size while being timed."""
    if q.shape[2] > 100:
        raise MemoryError("too large for this kernel")
    return good_attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, return_lse=return_lse)


class LargeFailPlugin:
    @hookimpl
    def switchyard_kernels(self):
        return [_k("small-only", raises_when_large)]


class SlowPerQueryPlugin:
    """A right nearest_neighbor kernel that sleeps 2 ms a query, logging how many queries it was given:
    the tuner's pilot should spare it the full-size timing run."""

    def __init__(self):
        self.seen = []

    @hookimpl
    def switchyard_kernels(self):
        import time

        from plugins.torch_backend.nearest_neighbor import nearest_neighbor

        def slow(queries, database, *, k, metric):
            self.seen.append(queries.shape[0])
            time.sleep(0.002 * queries.shape[0])
            return nearest_neighbor(queries, database, k=k, metric=metric)

        return [Kernel(op="nearest_neighbor", backend="slow-per-query", fn=slow, devices={"cpu"},
                       dtypes={torch.float32}, priority=100)]


def right_for_96_rows(q, k, v, *, causal, scale, attn_mask, return_lse):
    """Right up to query row 96 (the longest shrunk validation sample), zeros after it."""
    out = good_attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, return_lse=return_lse)
    o = (out[0] if return_lse else out).clone()
    o[:, :, 96:] = 0
    return (o, out[1]) if return_lse else o


class ShortSightedPlugin:
    @hookimpl
    def switchyard_kernels(self):
        return [_k("short-sighted", right_for_96_rows)]


class FlakyCollectivePlugin:
    """An all_reduce kernel that is right on small inputs and raises on more than 1000 elements."""

    @hookimpl
    def switchyard_kernels(self):
        from plugins.reference.all_reduce import all_reduce

        def flaky(tensors, *, op, group):
            if sum(t.numel() for t in (tensors if isinstance(tensors, (list, tuple)) else [tensors])) > 1000:
                raise RuntimeError("flaky: too big")
            return all_reduce(tensors, op=op, group=group)

        return [Kernel(op="all_reduce", backend="flaky", fn=flaky, devices={"cpu"}, priority=1000)]
