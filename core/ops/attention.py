"""attention: scaled dot-product attention with bottom-right causal alignment, GQA/MQA and a bool mask.

``o = softmax(scale * q @ k^T, masked) @ v`` per (batch, query head); query head ``h`` reads key/value
head ``h // (Hq // Hkv)``. ``causal`` lets query ``i`` attend key ``j`` only when ``j <= i + Lk - Lq``
(flash-attn >= 2.1). ``attn_mask`` (True = may attend) is ANDed in. Masked positions have no influence
at all (a NaN there does not reach the output); a row that may attend nothing gets 0 and lse -inf.

Compare rule (flash-attn's test suite): the kernel's max error against a float64 evaluation is at most
2x (gradients: 3x) the max error of the plain torch math in the input dtype against the same float64
evaluation, plus a floor of a few units of the dtype's rounding (4 for outputs; 16 for gradients, since a
flash-style backward recomputes P from the log-sum-exp and forms dS = P * (dP - rowsum(dO * O)), whose
cancellation costs float32 up to about ten units where the plain math's error can be near zero).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from core.errors import InvalidInput
from core.spec import (Attr, OpSpec, Sample, TensorMeta, Verdict, bucket, describe, dtype_name, max_abs_diff,
                       require_tensor)

NAME = "attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FWD_FACTOR, GRAD_FACTOR = 2.0, 3.0
FWD_FLOOR_UNITS, GRAD_FLOOR_UNITS = 4, 16
REFERENCE_WORK = 1 << 22  # B * Hq * Lq * Lk * (D + Dv) up to which candidates are also validated at full size


_DTYPE_SET = frozenset(DTYPES)
_CPU = torch.device("cpu")
_BOOL = torch.bool
_STRIDED = torch.strided
# (mask shape, B, Hq, Lq, Lk) -> the mask's kind, for shapes _verify_mask has accepted
_MASK_KINDS: dict[tuple[Any, ...], str] = {}


def _verify(args: tuple[Any, ...], attrs: dict[str, Any]) -> tuple[Any, ...] | None:
    """The happy path in one expression (this runs on every call); any doubt goes to the full check.

    Returns the dispatch key (the same tuple as ``_key``), built from the sizes read here, so the hot
    path reads each tensor's metadata once."""
    q, k, v = args
    try:
        dt = q.dtype
        B, Hq, Lq, D = q.shape
        Bk, Hkv, Lk, Dk = k.shape
        Bv, Hv, Lv, Dv = v.shape
        causal, return_lse = attrs["causal"], attrs["return_lse"]
        if q.is_cpu and k.is_cpu and v.is_cpu:  # .device builds an object and == compares two: a fifth of this
            dev = _CPU
        else:
            dev = q.device
            if k.device != dev or v.device != dev:
                raise ValueError
        fine = (dt in _DTYPE_SET and k.dtype is dt and v.dtype is dt
                and q.layout is _STRIDED and k.layout is _STRIDED and v.layout is _STRIDED
                and B == Bk == Bv and Dk == D > 0 and Hv == Hkv > 0 and Lv == Lk and Hq % Hkv == 0
                and causal.__class__ is bool and return_lse.__class__ is bool
                and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor))
    except (AttributeError, TypeError, IndexError, ValueError):
        fine = False
    if not fine:
        _verify_tensors(q, k, v, attrs)
    scale = attrs["scale"]
    if scale is None:
        attrs["scale"] = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidInput(f"{NAME}: argument 'scale': expected a finite float or None, got {scale!r}")
    else:
        attrs["scale"] = float(scale)
    mask = attrs["attn_mask"]
    if mask is None:
        kind = "none"
    else:
        try:  # a bool mask on q's device, of a shape seen before for these sizes: two reads and a lookup
            kind = (mask.dtype is _BOOL and mask.layout is _STRIDED
                    and (mask.is_cpu if dev is _CPU else mask.device == dev)
                    and isinstance(mask, torch.Tensor) and _MASK_KINDS.get((mask.shape, B, Hq, Lq, Lk)))
        except (AttributeError, TypeError):
            kind = None
        if not kind:
            _verify_mask(mask, q, (B, Hq, Lq, Lk))
            kind = _mask_kind(mask)
            if len(_MASK_KINDS) >= 4096:  # shapes seen, bounded
                _MASK_KINDS.clear()
            try:
                _MASK_KINDS[(mask.shape, B, Hq, Lq, Lk)] = kind
            except TypeError:  # symbolic sizes while tracing are not hashable: nothing to remember
                pass
    try:  # bucket() inlined
        return (dev, dt, B if B <= 1 else 1 << (B - 1).bit_length(), Hq, Hkv,
                Lq if Lq <= 1 else 1 << (Lq - 1).bit_length(), Lk if Lk <= 1 else 1 << (Lk - 1).bit_length(), D,
                Dv, causal, kind, return_lse)
    except AttributeError:  # symbolic sizes while tracing: no key wanted there (the caller falls back to _key)
        return None


def _fast_key(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """What ``_verify`` and ``_key`` read of an unmasked call, in one tuple: each input's class, dtype and
    layout, their device, their sizes with Lq and Lk in the key's buckets (whether v's length equals k's
    is what verify asks of it), and each attribute with its exact type. None for a masked call (the
    mask's kind is worked out from its shape and strides: those calls keep verify) and for inputs that
    are not three 4-D tensors.

    A warm decode step then skips verify and the key, also while its cache grows by one key a step:
    right after a kernel that streamed megabytes of keys and values through the caches, those Python
    steps ran 3-4x their warm time (float32 [1, 16, 1, 64] against 1024 keys: 11 us of verify, where it
    takes 1.5 us on its own)."""
    if attrs["attn_mask"] is not None:
        return None
    q, k, v = args
    causal, scale, return_lse = attrs["causal"], attrs["scale"], attrs["return_lse"]
    try:
        dev = _CPU if q.is_cpu and k.is_cpu and v.is_cpu else (q.device, k.device, v.device)
        B, Hq, Lq, D = q.shape
        Bk, Hkv, Lk, Dk = k.shape
        Bv, Hv, Lv, Dv = v.shape
        return (q.__class__, k.__class__, v.__class__, q.dtype, k.dtype, v.dtype, dev, q.layout, k.layout,
                v.layout, B, Hq, Lq if Lq <= 1 else 1 << (Lq - 1).bit_length(), D, Bk, Hkv,
                Lk if Lk <= 1 else 1 << (Lk - 1).bit_length(), Dk, Bv, Hv, Lv == Lk, Dv, causal.__class__, causal,
                scale.__class__, scale, return_lse.__class__, return_lse)
    except (AttributeError, TypeError, ValueError):  # not 4-D tensors, or symbolic sizes
        return None


def _verify_tensors(q: Any, k: Any, v: Any, attrs: Mapping[str, Any]) -> None:
    """Find the first broken rule and raise with a message that names it."""
    for arg, t in (("q", q), ("k", k), ("v", v)):
        require_tensor(NAME, arg, t)
        if t.dim() != 4:
            raise InvalidInput(f"{NAME}: argument {arg!r}: expected a 4-D tensor [B, H, L, D], got shape {tuple(t.shape)}")
    if q.dtype not in DTYPES:
        raise InvalidInput(f"{NAME}: argument 'q': expected dtype one of {[dtype_name(d) for d in DTYPES]}, got {q.dtype}")
    for arg, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise InvalidInput(f"{NAME}: argument {arg!r}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        if t.device != q.device:
            raise InvalidInput(f"{NAME}: argument {arg!r}: expected device {q.device} (the device of q), got {t.device}")
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise InvalidInput(f"{NAME}: argument 'k'/'v': expected batch {B} (the batch of q), got k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != D:
        raise InvalidInput(f"{NAME}: argument 'k': expected head dim {D} (the head dim of q), got {k.shape[3]}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise InvalidInput(f"{NAME}: argument 'v': expected [B, Hkv, Lk, Dv] with Hkv={k.shape[1]}, Lk={k.shape[2]} "
                           f"(those of k), got shape {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise InvalidInput(f"{NAME}: argument 'k': expected a number of key/value heads dividing the {Hq} query heads, got {Hkv}")
    if D == 0:
        raise InvalidInput(f"{NAME}: argument 'q': expected head dim D >= 1, got {D}")
    causal = attrs["causal"]
    if not isinstance(causal, bool):
        raise InvalidInput(f"{NAME}: argument 'causal': expected a bool, got {causal!r}")
    if not isinstance(attrs["return_lse"], bool):
        raise InvalidInput(f"{NAME}: argument 'return_lse': expected a bool, got {attrs['return_lse']!r}")
    raise InvalidInput(f"{NAME}: inputs {describe(q)}, {describe(k)}, {describe(v)} break the contract")  # pragma: no cover


def _verify_mask(mask: Any, q: torch.Tensor, full: tuple[int, int, int, int]) -> None:
    require_tensor(NAME, "attn_mask", mask)
    if mask.dtype != torch.bool:
        raise InvalidInput(f"{NAME}: argument 'attn_mask': expected dtype torch.bool (True = may attend), got {mask.dtype}")
    if mask.device != q.device:
        raise InvalidInput(f"{NAME}: argument 'attn_mask': expected device {q.device}, got {mask.device}")
    shape = tuple(mask.shape)
    if len(shape) > 4 or any(s not in (1, f) for s, f in zip(shape[::-1], full[::-1])):
        raise InvalidInput(f"{NAME}: argument 'attn_mask': expected a shape broadcastable to {list(full)} "
                           f"[B, Hq, Lq, Lk], got {list(shape)}")


def _mask_kind(mask: torch.Tensor | None) -> str:
    if mask is None:
        return "none"
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return "".join("1" if s == 1 else "x" for s in shape)


def _key(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[Any, ...]:
    q, k, v = args
    B, Hq, Lq, D = q.shape
    mask = attrs["attn_mask"]
    return (q.device, q.dtype, bucket(B), Hq, k.shape[1], bucket(Lq), bucket(k.shape[2]), D, v.shape[3],
            attrs["causal"], "none" if mask is None else _mask_kind(mask), attrs["return_lse"])


def _device(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> str:
    return args[0].device.type


def _dtypes(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[torch.dtype, ...]:
    return (args[0].dtype,)


def _infer(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> Any:
    q, _, v = args
    o = TensorMeta(shape=(*q.shape[:3], v.shape[3]), dtype=q.dtype)
    if attrs["return_lse"]:
        return (o, TensorMeta(shape=tuple(q.shape[:3]), dtype=torch.float32))
    return o


# -- samples -----------------------------------------------------------------------------------------

def make_inputs(gen: torch.Generator, device: str, dtype: torch.dtype, B: int, Hq: int, Hkv: int, Lq: int, Lk: int,
                D: int, Dv: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random q, k, v (standard normal) of the given sizes."""
    Dv = D if Dv is None else Dv

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    return rnd(B, Hq, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, Dv)


def random_mask(gen: torch.Generator, shape: Sequence[int], device: str, *, dead_row: bool = True) -> torch.Tensor:
    """A mask that is mostly True, with one fully masked query row when the shape has rows."""
    mask = torch.rand(*shape, generator=gen) < 0.8
    if dead_row and len(shape) >= 2 and shape[-2] > 1:
        mask[..., shape[-2] // 2, :] = False
    return mask.to(device)


def _resample(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator, Lq: int, Lk: int, B: int,
              Hkv: int, Hq: int) -> Sample:
    q, k, v = args
    device = q.device.type
    nq, nk, nv = make_inputs(gen, device, q.dtype, B, Hq, Hkv, Lq, Lk, q.shape[3], v.shape[3])
    new = dict(attrs)
    mask = attrs["attn_mask"]
    if mask is not None:
        full = (B, Hq, Lq, Lk)
        shape = [1 if s == 1 else f for s, f in zip((1,) * (4 - mask.dim()) + tuple(mask.shape), full)][4 - mask.dim():]
        new["attn_mask"] = random_mask(gen, shape, device)
    return Sample(args=(nq, nk, nv), attrs=new)


def _fits_reference(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> bool:
    """The numpy reference takes about 0.1 s (and its backward as much) at 2**22 units of work."""
    q, k, v = args
    B, Hq, Lq, D = q.shape
    return B * Hq * Lq * k.shape[2] * (D + v.shape[3]) <= REFERENCE_WORK


def _synthesize(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator) -> Sample:
    q, k, _ = args
    return _resample(args, attrs, gen, q.shape[2], k.shape[2], q.shape[0], k.shape[1], q.shape[1])


def _shrink(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator) -> Sample:
    q, k, _ = args
    Lq, Lk = q.shape[2], k.shape[2]
    f = min(1.0, 96 / max(Lq, Lk, 1))
    sLq = Lq if Lq <= 1 else max(2, round(Lq * f))
    sLk = Lk if Lk <= 1 else max(2, round(Lk * f))
    if Lq > Lk:  # keep the relation between the lengths (it decides which rows the causal mask empties)
        sLq = max(sLq, sLk + 1)
    elif Lq < Lk:
        sLk = max(sLk, sLq + 1)
    Hkv = min(k.shape[1], 2)
    group = q.shape[1] // k.shape[1]
    return _resample(args, attrs, gen, sLq, sLk, min(q.shape[0], 2), Hkv, Hkv * min(group, 3))


def _oracle(sample: Sample) -> Sample:
    return Sample(args=tuple(a.detach().to(torch.float64) for a in sample.args), attrs=sample.attrs, name=sample.name)


def _case(B: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, *, dtype: torch.dtype = torch.float32, causal: bool = False,
          mask: str | None = None, Dv: int | None = None, nan_masked: bool = False, return_lse: bool = False) -> Any:
    def make(gen: torch.Generator, device: str) -> Sample:
        q, k, v = make_inputs(gen, device, dtype, B, Hq, Hkv, Lq, Lk, D, Dv)
        attn_mask = None
        if mask == "full":
            attn_mask = random_mask(gen, (B, Hq, Lq, Lk), device)
        elif mask == "keys":  # key padding: the last keys are masked for every query
            attn_mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool, device=device)
            attn_mask[..., Lk - max(1, Lk // 4):] = False
        if nan_masked:
            k[..., -1, :] = float("nan")
            v[..., -1, :] = float("nan")
        return Sample(args=(q, k, v), attrs={"causal": causal, "scale": 1.0 / math.sqrt(D), "attn_mask": attn_mask,
                                             "return_lse": return_lse})
    return make


CASES = {
    "b2-h8-l256-d64": _case(2, 8, 8, 256, 256, 64),
    "b2-h8-l256-d64-causal": _case(2, 8, 8, 256, 256, 64, causal=True),
    "gqa-h8-kv2-l128-d64": _case(1, 8, 2, 128, 128, 64, causal=True),
    "decode-lq1-lk512-d128": _case(4, 8, 8, 1, 512, 128),
}

EDGE_CASES = {
    "lq-gt-lk-causal": _case(1, 2, 2, 37, 19, 16, causal=True),
    "lq-lt-lk-causal": _case(1, 2, 2, 19, 37, 16, causal=True, return_lse=True),
    "lq1": _case(2, 2, 1, 1, 23, 32),
    "d59-dv33": _case(1, 2, 2, 17, 29, 59, Dv=33),
    "gqa": _case(2, 6, 2, 16, 16, 8),
    "mqa": _case(1, 4, 1, 16, 24, 8, causal=True),
    "all-masked-row": _case(1, 2, 2, 8, 8, 16, mask="full", return_lse=True),
    "masked-nan": _case(1, 2, 2, 8, 12, 16, mask="keys", nan_masked=True),
    "float64": _case(1, 2, 2, 9, 9, 8, dtype=torch.float64, causal=True),
    "bfloat16": _case(1, 2, 2, 16, 16, 16, dtype=torch.bfloat16),
}


# -- compare rule ------------------------------------------------------------------------------------

def plain_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
               attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain torch math in the inputs' dtype, the baseline the compare rule's tolerance is measured by,
    with the op's rules: masked keys and values are selected away before any product (a NaN there reaches
    nothing), attended inf and NaN follow IEEE arithmetic, a row that attends nothing gets 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    allowed = allowed_positions(q.shape[2], k.shape[2], causal, attn_mask, q.device)
    finite_k, finite_v = bool(torch.isfinite(k).all()), bool(torch.isfinite(v).all())
    if finite_k:
        s = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    else:  # [.., Lq, Lk, D]: each key selected per query
        ks = torch.where(allowed[..., None], k[..., None, :, :], 0)
        s = torch.where(allowed, (q[..., :, None, :] * ks).sum(-1) * scale, float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)  # -inf: attends nothing; NaN or +inf: poisoned
    p = torch.softmax(s, dim=-1).masked_fill(torch.isneginf(lse)[..., None], 0.0)
    if finite_v:
        o = p @ v
    else:
        o = (p[..., None] * torch.where(allowed[..., None], v[..., None, :, :], 0)).sum(-2)
    return o, lse


def allowed_positions(Lq: int, Lk: int, causal: bool, attn_mask: torch.Tensor | None, device: Any) -> torch.Tensor:
    """Bool [.., Lq, Lk]: where a query may attend a key (causal bottom-right AND the mask)."""
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Lq, device=device)[:, None]
        j = torch.arange(Lk, device=device)[None, :]
        allowed = j <= i + (Lk - Lq)
    if attn_mask is not None:
        allowed = allowed & attn_mask
    return allowed


def _floor(dtype: torch.dtype, scale: float, units: int = FWD_FLOOR_UNITS) -> float:
    return units * float(torch.finfo(dtype).eps) * max(1.0, scale)


def _compare(out: Any, ref: Any, sample: Sample) -> Verdict:
    q, k, v = sample.args
    attrs = sample.attrs
    o, lse = (out if attrs["return_lse"] else (out, None))
    ref_o, ref_lse = (ref if attrs["return_lse"] else (ref, None))
    with torch.no_grad():
        base_o, base_lse = plain_math(q, k, v, attrs["causal"], attrs["scale"], attrs["attn_mask"])
    bound_o = FWD_FACTOR * max_abs_diff(base_o, ref_o) + _floor(q.dtype, float(ref_o.detach().abs().nan_to_num(0).max()) if ref_o.numel() else 1.0)
    err = max_abs_diff(o, ref_o)
    if not err <= bound_o:
        return Verdict(ok=False, max_error=err, reason=f"output error {err:.3g} exceeds {bound_o:.3g} "
                       f"({FWD_FACTOR:g}x the plain torch math's error in {dtype_name(q.dtype)}, plus a floor)")
    if lse is not None:
        lerr = max_abs_diff(lse, ref_lse)
        bound_l = FWD_FACTOR * max_abs_diff(base_lse, ref_lse) + _floor(torch.float32, float(ref_lse.abs().nan_to_num(0, 0, 0).max()) if ref_lse.numel() else 1.0)
        if not lerr <= bound_l:
            return Verdict(ok=False, max_error=lerr, reason=f"log-sum-exp error {lerr:.3g} exceeds {bound_l:.3g}")
        err = max(err, lerr)
    return Verdict(ok=True, max_error=err)


def _grad_outputs(out: Any, gen: torch.Generator) -> Sequence[Any]:
    o = out[0] if isinstance(out, tuple) else out
    g = torch.randn(*o.shape, generator=gen, dtype=torch.float32).to(device=o.device, dtype=o.dtype)
    return (g, None) if isinstance(out, tuple) else (g,)


def _compare_grads(grads: Sequence[Any], ref_grads: Sequence[Any], sample: Sample, grad_outputs: Sequence[Any]) -> Verdict:
    q, k, v = sample.args
    attrs = sample.attrs
    inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with torch.enable_grad():
        base_o, _ = plain_math(*inputs, attrs["causal"], attrs["scale"], attrs["attn_mask"])
        g = grad_outputs[0].to(device=q.device, dtype=q.dtype)
    worst = 0.0
    base = torch.autograd.grad(base_o, inputs, g, allow_unused=True)
    for name, got, want, b in zip("qkv", grads, ref_grads, base):
        want = torch.as_tensor(want)
        got = torch.zeros_like(want) if got is None else got
        b = torch.zeros_like(want) if b is None else b
        bound = GRAD_FACTOR * max_abs_diff(b, want) + _floor(q.dtype, float(want.abs().max()) if want.numel() else 1.0,
                                                             GRAD_FLOOR_UNITS)
        err = max_abs_diff(got, want)
        if not err <= bound:
            return Verdict(ok=False, max_error=err, reason=f"d{name} error {err:.3g} exceeds {bound:.3g} "
                           f"({GRAD_FACTOR:g}x the plain torch math's, plus a floor)")
        worst = max(worst, err)
    return Verdict(ok=True, max_error=worst)


SPEC = OpSpec(
    name=NAME,
    summary="Scaled dot-product attention with bottom-right causal alignment, GQA/MQA and a boolean mask",
    inputs=("q", "k", "v"),
    attrs=(
        Attr(name="causal", default=False, doc="bottom-right aligned: query i attends key j iff j <= i + Lk - Lq"),
        Attr(name="scale", default=None, doc="score scale; None means 1/sqrt(D)"),
        Attr(name="attn_mask", default=None, doc="bool, broadcastable to [B, Hq, Lq, Lk], True = may attend"),
        Attr(name="return_lse", default=False, doc="also return the float32 log-sum-exp [B, Hq, Lq]"),
    ),
    verify=_verify,
    fast_key=_fast_key,
    key=_key,
    key_sizes=(2, 5, 6),
    device=_device,
    dtypes=_dtypes,
    infer=_infer,
    shrink=_shrink,
    synthesize=_synthesize,
    fits_reference=_fits_reference,
    compare=_compare,
    cases=CASES,
    edge_cases=EDGE_CASES,
    oracle=_oracle,
    grad_inputs=(0, 1, 2),
    grad_outputs=_grad_outputs,
    compare_grads=_compare_grads,
)
