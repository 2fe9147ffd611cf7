"""split_finding: the best split of every tree node from gradient and hessian histograms (XGBoost ``hist``).

Each row has quantized features ``bins[i, :]`` (uint8 in ``[0, num_bins)``, 255 = missing), a gradient
and a hessian, and belongs to node ``node_ids[i]`` (-1: the row takes no part). A split ``(f, t, d)``
sends a row left when ``bins[i, f] <= t``, right when it is ``> t``, and a missing row left exactly
when ``d``. Candidates are ``t`` in ``[0, num_bins - 2]`` and both ``d``. With ``T(g) = sign(g) *
max(|g| - reg_alpha, 0)`` and ``score(G, H) = T(G)^2 / (H + reg_lambda)`` (0 when ``H + reg_lambda``
is 0, as XGBoost's ``CalcGain`` returns 0 for a node without hessian), the gain is XGBoost's
``loss_chg``: ``score(GL, HL) + score(GR, HR) - score(G, H)``, no one-half, gamma not subtracted. A
candidate is valid when ``HL >= min_child_weight``, ``HR >= min_child_weight`` and ``gain > gamma``.
Per node the valid candidate of largest gain wins; ties go to the lower feature, the lower threshold,
then ``default_left=False``. A node without a valid candidate gets feature -1, threshold -1,
``default_left`` False, gain 0 and zero sums. Besides the contract's bad inputs, non-finite gradients
or hessians are rejected too (one aminmax per input: a NaN gradient would make every gain NaN).

Compare rule: sums taken in another order give slightly different gains, so near-ties may resolve
differently. A kernel's answer is right when its reported sums equal a float64 recomputation of its
chosen split, that split's float64 gain is within tolerance of the float64 best gain, and "no split"
agrees except within tolerance of the validity thresholds. The tolerance of a sum over ``n`` rows is
``4 * eps(dtype) * sqrt(n + num_bins) * sum|x|``: recursive summation's rounding errors add up as a
random walk, about ``eps * sqrt(n)`` of ``sum|x|`` (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., section 4.2), with headroom for the prefix sum over the bins; every sum of a
node (either side of any split) is held to that node's tolerance. A gain's tolerance is the first-order
propagation of those through its three scores: ``2 |T(G)| tol_G / (H + lambda) + T(G)^2 tol_H / (H +
lambda)^2`` each. Float64 inputs get tolerances near 1e-13 of the sums; float32 ones near 1e-5 for a
few thousand rows.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch

from core.errors import InvalidInput
from core.spec import (Attr, OpSpec, REQUIRED, Sample, TensorMeta, Verdict, bucket, device_type, dtype_name, reads_data,
                       require_tensor)

NAME = "split_finding"
MISSING = 255
DTYPES = (torch.float32, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)
REFERENCE_BINS = 1 << 19  # up to N * F this large, candidates are also validated at full size
SUM_FACTOR = 4.0


class SplitResult(NamedTuple):
    """Per-node best split; every field is a tensor of shape [num_nodes]."""

    feature: torch.Tensor  # int64, -1 for no split
    threshold: torch.Tensor  # int64 bin: a row goes left when its bin <= threshold
    default_left: torch.Tensor  # bool: where missing rows go
    gain: torch.Tensor  # float64, XGBoost's loss_chg
    left_grad: torch.Tensor  # float64 sums of the rows sent left / right
    left_hess: torch.Tensor
    right_grad: torch.Tensor
    right_hess: torch.Tensor


OUT_DTYPES = (torch.int64, torch.int64, torch.bool, torch.float64, torch.float64, torch.float64, torch.float64,
              torch.float64)


# -- verify ------------------------------------------------------------------------------------------

def _integer(attrs: dict[str, Any], name: str, low: int, high: int | None = None) -> int:
    value = attrs[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInput(f"{NAME}: argument {name!r}: expected an int, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidInput(f"{NAME}: argument {name!r}: expected an int {allowed}, got {value!r}")
    attrs[name] = int(value)
    return int(value)


def _nonnegative(attrs: dict[str, Any], name: str) -> None:
    value = attrs[name]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value < 0:
        raise InvalidInput(f"{NAME}: argument {name!r}: expected a finite float >= 0, got {value!r}")
    attrs[name] = float(value)


def _verify(args: tuple[Any, ...], attrs: dict[str, Any]) -> None:
    bins, grad, hess, node_ids = args
    for arg, t in (("bins", bins), ("grad", grad), ("hess", hess), ("node_ids", node_ids)):
        require_tensor(NAME, arg, t)
    if bins.dim() != 2:
        raise InvalidInput(f"{NAME}: argument 'bins': expected a 2-D tensor [N, F], got shape {tuple(bins.shape)}")
    if bins.dtype != torch.uint8:
        raise InvalidInput(f"{NAME}: argument 'bins': expected dtype torch.uint8 (quantized features, 255 = missing), "
                           f"got {bins.dtype}")
    n = bins.shape[0]
    if grad.dtype not in DTYPES:
        raise InvalidInput(f"{NAME}: argument 'grad': expected dtype one of {[dtype_name(d) for d in DTYPES]}, got {grad.dtype}")
    if hess.dtype != grad.dtype:
        raise InvalidInput(f"{NAME}: argument 'hess': expected dtype {grad.dtype} (the dtype of grad), got {hess.dtype}")
    if node_ids.dtype not in ID_DTYPES:
        raise InvalidInput(f"{NAME}: argument 'node_ids': expected dtype int32 or int64, got {node_ids.dtype}")
    for arg, t in (("grad", grad), ("hess", hess), ("node_ids", node_ids)):
        if t.dim() != 1 or t.shape[0] != n:
            raise InvalidInput(f"{NAME}: argument {arg!r}: expected a 1-D tensor of N={n} rows (the rows of bins), "
                               f"got shape {tuple(t.shape)}")
        if t.device != bins.device:
            raise InvalidInput(f"{NAME}: argument {arg!r}: expected device {bins.device} (the device of bins), got {t.device}")
    num_nodes = _integer(attrs, "num_nodes", 1)
    num_bins = _integer(attrs, "num_bins", 1, MISSING)
    for name in ("reg_lambda", "reg_alpha", "gamma", "min_child_weight"):
        _nonnegative(attrs, name)
    if n == 0 or not all(reads_data(t) for t in (bins, grad, hess, node_ids)):
        return
    # The contract's value ranges: each is one pass over the data (num_bins=255 needs none for bins).
    # bins + 1 wraps the missing 255 to 0 in uint8, so one max (one temporary, not three) tells whether
    # any value lies in [num_bins, 255).
    if num_bins < MISSING and int((bins + 1).amax()) > num_bins:
        bad = (bins >= num_bins) & (bins != MISSING)
        if bool(bad.any()):
            value = int(bins[bad][0])
            raise InvalidInput(f"{NAME}: argument 'bins': expected values in [0, {num_bins}) (num_bins={num_bins}) "
                               f"or {MISSING} for missing, got {value}")
    # One reduction per input (NaN propagates through aminmax) and one host sync for all of them.
    ranges = torch.stack([v.to(torch.float64) for t in (grad, hess, node_ids) for v in torch.aminmax(t)]).tolist()
    (gmin, gmax), (hmin, hmax), (low, high) = ranges[0:2], ranges[2:4], ranges[4:6]
    if not (math.isfinite(gmin) and math.isfinite(gmax)):
        raise InvalidInput(f"{NAME}: argument 'grad': expected finite values, got values in [{gmin!r}, {gmax!r}]")
    if not (hmin >= 0 and math.isfinite(hmax)):
        raise InvalidInput(f"{NAME}: argument 'hess': expected finite values >= 0, got values in [{hmin!r}, {hmax!r}]")
    if low < -1 or high >= num_nodes:
        raise InvalidInput(f"{NAME}: argument 'node_ids': expected values in [-1, {num_nodes}) (num_nodes={num_nodes}, "
                           f"-1 = row takes no part), got values in [{int(low)}, {int(high)}]")


def _key(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[Any, ...]:
    bins, grad, _, node_ids = args
    return (device_type(bins), str(grad.dtype), str(node_ids.dtype), bucket(bins.shape[0]), bucket(bins.shape[1]),
            bucket(attrs["num_nodes"]), attrs["num_bins"])


def _device(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> str:
    return args[0].device.type


def _dtypes(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[torch.dtype, ...]:
    return (args[1].dtype,)


def _infer(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> SplitResult:
    shape = (attrs["num_nodes"],)
    return SplitResult(*(TensorMeta(shape=shape, dtype=d) for d in OUT_DTYPES))


def empty_result(num_nodes: int, device: Any) -> SplitResult:
    """The "no split anywhere" answer, for kernels to fill in."""
    return SplitResult(*(torch.zeros(num_nodes, dtype=d, device=device) for d in OUT_DTYPES))._replace(
        feature=torch.full((num_nodes,), -1, dtype=torch.int64, device=device),
        threshold=torch.full((num_nodes,), -1, dtype=torch.int64, device=device))


# -- samples -----------------------------------------------------------------------------------------

def make_inputs(gen: torch.Generator, device: str, *, n: int, f: int, num_nodes: int, num_bins: int = 255,
                dtype: torch.dtype = torch.float32, id_dtype: torch.dtype = torch.int32, missing: float = 0.05,
                inactive: float = 0.05) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random (bins, grad, hess, node_ids): uniform bins with a share missing, normal gradients,
    hessians in (0, 1] like the logistic loss's, rows spread over the nodes with a share inactive."""
    bins = torch.randint(0, num_bins, (n, f), generator=gen, dtype=torch.uint8)
    bins[torch.rand(n, f, generator=gen) < missing] = MISSING
    grad = torch.randn(n, generator=gen, dtype=torch.float64)
    hess = torch.rand(n, generator=gen, dtype=torch.float64) * 0.95 + 0.05
    node_ids = torch.randint(0, num_nodes, (n,), generator=gen, dtype=torch.int64)
    node_ids = torch.where(torch.rand(n, generator=gen) < inactive, -1, node_ids)
    return (bins.to(device), grad.to(device=device, dtype=dtype), hess.to(device=device, dtype=dtype),
            node_ids.to(device=device, dtype=id_dtype))


def _resample(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator, n: int, f: int,
              num_nodes: int) -> Sample:
    bins, grad, _, node_ids = args
    new = dict(attrs)
    new["num_nodes"] = num_nodes
    inputs = make_inputs(gen, bins.device.type, n=n, f=f, num_nodes=num_nodes, num_bins=attrs["num_bins"],
                         dtype=grad.dtype, id_dtype=node_ids.dtype)
    return Sample(args=inputs, attrs=new)


def _fits_reference(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> bool:
    """The numpy reference scans 2**19 (row, feature) bins in about 0.07 s."""
    return args[0].numel() <= REFERENCE_BINS


def _synthesize(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator) -> Sample:
    bins = args[0]
    return _resample(args, attrs, gen, bins.shape[0], bins.shape[1], attrs["num_nodes"])


def _shrink(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator) -> Sample:
    bins = args[0]
    num_nodes = min(attrs["num_nodes"], 16)
    n = min(bins.shape[0], max(2048, 256 * num_nodes))
    return _resample(args, attrs, gen, n, min(bins.shape[1], 6), num_nodes)


def _case(n: int, f: int, num_nodes: int, *, num_bins: int = 255, dtype: torch.dtype = torch.float32,
          id_dtype: torch.dtype = torch.int32, missing: float = 0.05, inactive: float = 0.05,
          edit: Any = None, **attrs: Any) -> Any:
    def make(gen: torch.Generator, device: str) -> Sample:
        inputs = make_inputs(gen, "cpu", n=n, f=f, num_nodes=num_nodes, num_bins=num_bins, dtype=dtype,
                             id_dtype=id_dtype, missing=missing, inactive=inactive)
        if edit is not None:
            inputs = edit(gen, *inputs)
        full = {"num_nodes": num_nodes, "num_bins": num_bins, "reg_lambda": 1.0, "reg_alpha": 0.0, "gamma": 0.0,
                "min_child_weight": 1.0, **attrs}
        return Sample(args=tuple(t.to(device) for t in inputs), attrs=full)
    return make


def _empty_nodes(gen: torch.Generator, bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor,
                 node_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Nodes 1 and 3 get no rows (their rows are made inactive)."""
    node_ids = torch.where((node_ids == 1) | (node_ids == 3), -1, node_ids)
    return bins, grad, hess, node_ids


def _degenerate_features(gen: torch.Generator, bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor,
                         node_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Feature 0 constant, feature 1 all missing, feature 3 a copy of feature 2 (exact ties)."""
    bins = bins.clone()
    bins[:, 0] = 7
    bins[:, 1] = MISSING
    bins[:, 3] = bins[:, 2]
    return bins, grad, hess, node_ids


def _integer_grads(gen: torch.Generator, bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor,
                   node_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Small integer gradients and unit hessians: every sum is exact, so gains tie exactly."""
    g = torch.randint(-3, 4, grad.shape, generator=gen).to(grad.dtype)
    return bins, g, torch.ones_like(hess), node_ids


def _zero_hess(gen: torch.Generator, bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor,
               node_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A third of the hessians exactly 0 (with reg_lambda=0 a side may have H + lambda == 0)."""
    hess = torch.where(torch.rand(hess.shape, generator=gen) < 0.34, 0.0, hess.double()).to(hess.dtype)
    return bins, grad, hess, node_ids


CASES = {
    "n65536-f28-root": _case(65536, 28, 1),
    "n65536-f28-nodes16": _case(65536, 28, 16),
    "n16384-f8-nodes4-b64-f64": _case(16384, 8, 4, num_bins=64, dtype=torch.float64, id_dtype=torch.int64),
}

EDGE_CASES = {
    "empty-nodes": _case(600, 4, 5, num_bins=32, edit=_empty_nodes),
    "all-inactive": _case(100, 3, 2, num_bins=16, inactive=1.0),
    "no-rows": _case(0, 3, 2, num_bins=16),
    "degenerate-features": _case(800, 5, 3, num_bins=24, edit=_degenerate_features),
    "integer-grads-ties": _case(500, 4, 3, num_bins=6, missing=0.0, edit=_integer_grads),
    "one-bin": _case(200, 3, 2, num_bins=1),
    "two-bins": _case(300, 3, 2, num_bins=2, missing=0.2),
    "float64-int64-ids": _case(700, 5, 4, num_bins=40, dtype=torch.float64, id_dtype=torch.int64),
    "alpha-gamma": _case(900, 4, 3, num_bins=30, reg_alpha=0.5, gamma=0.3, reg_lambda=2.0),
    "lambda0-mcw0-zero-hess": _case(500, 4, 3, num_bins=20, reg_lambda=0.0, min_child_weight=0.0, edit=_zero_hess),
    "heavy-min-child-weight": _case(400, 4, 3, num_bins=50, min_child_weight=40.0),
    "huge-gamma": _case(300, 3, 2, num_bins=16, gamma=1e6),
    "many-missing": _case(500, 4, 2, num_bins=12, missing=0.6),
}


# -- compare rule ------------------------------------------------------------------------------------

def _threshold_l1(g: np.ndarray, alpha: float) -> np.ndarray:
    return np.sign(g) * np.maximum(np.abs(g) - alpha, 0.0)


def _score(g: np.ndarray, h: np.ndarray, lam: float, alpha: float) -> np.ndarray:
    den = h + lam
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, _threshold_l1(g, alpha) ** 2 / np.where(den > 0, den, 1.0), 0.0)


class _Candidates(NamedTuple):
    """Every candidate of every node in float64: [M, F, T, 2] arrays (T = num_bins - 1 thresholds, d = 0/1),
    the node totals [M] and the tolerances of the rule."""

    gl: np.ndarray
    hl: np.ndarray
    gain: np.ndarray
    tol_gain: np.ndarray
    gp: np.ndarray
    hp: np.ndarray
    tol_g: np.ndarray  # [M]: tolerance of any gradient sum of the node
    tol_h: np.ndarray  # [M]: tolerance of any hessian sum of the node


def _score_tol(g: np.ndarray, h: np.ndarray, tol_g: np.ndarray, tol_h: np.ndarray, lam: float, alpha: float) -> np.ndarray:
    """First-order error of score(G, H) when G and H are off by up to tol_g and tol_h."""
    den = h + lam
    t = np.abs(_threshold_l1(g, alpha))
    safe = np.where(den > 0, den, 1.0)
    return np.where(den > 0, 2 * t * tol_g / safe + t**2 * tol_h / safe**2, 0.0)


def _candidates(sample: Sample) -> _Candidates:
    bins, grad, hess, node_ids = (t.detach().cpu() for t in sample.args)
    a = sample.attrs
    M, B = a["num_nodes"], a["num_bins"]
    lam, alpha, eps = a["reg_lambda"], a["reg_alpha"], float(torch.finfo(grad.dtype).eps)
    F = bins.shape[1]
    ids = node_ids.numpy().astype(np.int64)
    keep = ids >= 0
    b = bins.numpy()[keep].astype(np.int64)
    b = np.where(b == MISSING, B, b)  # missing in slot B
    ids = ids[keep]
    g, h = grad.numpy()[keep].astype(np.float64), hess.numpy()[keep].astype(np.float64)
    slot = (ids[:, None] * F + np.arange(F)[None, :]) * (B + 1) + b

    def hist(w: np.ndarray) -> np.ndarray:
        return np.bincount(slot.ravel(), weights=np.repeat(w, F), minlength=M * F * (B + 1)).reshape(M, F, B + 1)

    hg, hh = hist(g), hist(h)
    count = np.bincount(ids, minlength=M).astype(np.float64)
    gp, hp, ap = (np.bincount(ids, weights=w, minlength=M) for w in (g, h, np.abs(g)))
    rel = SUM_FACTOR * eps * np.sqrt(count + B)
    tol_g, tol_h = rel * ap, rel * hp
    # [M, F, T, 2]: d=0 sends missing right, d=1 left
    gl, hl = (np.stack([c, c + x[..., B:]], axis=-1) for c, x in
              ((np.cumsum(hg[..., :B - 1], axis=-1), hg), (np.cumsum(hh[..., :B - 1], axis=-1), hh)))
    gr, hr = gp[:, None, None, None] - gl, hp[:, None, None, None] - hl
    gain = _score(gl, hl, lam, alpha) + _score(gr, hr, lam, alpha) - _score(gp, hp, lam, alpha)[:, None, None, None]
    tg, th = tol_g[:, None, None, None], tol_h[:, None, None, None]
    tol_gain = (_score_tol(gl, hl, tg, th, lam, alpha) + _score_tol(gr, hr, tg, th, lam, alpha)
                + _score_tol(gp, hp, tol_g, tol_h, lam, alpha)[:, None, None, None])
    return _Candidates(gl=gl, hl=hl, gain=gain, tol_gain=tol_gain, gp=gp, hp=hp, tol_g=tol_g, tol_h=tol_h)


def _node_problem(m: int, c: _Candidates, out: list[np.ndarray], attrs: Mapping[str, Any]) -> tuple[str, float]:
    """Why node m's answer breaks the compare rule ("" when it does not), and its error."""
    feature, threshold, default_left, gain, lg, lh, rg, rh = (o[m].item() for o in out)
    mcw, gamma = attrs["min_child_weight"], attrs["gamma"]
    hl, hr, tol_h = c.hl[m], c.hp[m] - c.hl[m], c.tol_h[m]
    strict = (hl >= mcw + tol_h) & (hr >= mcw + tol_h) & (c.gain[m] > gamma + c.tol_gain[m])
    if feature == -1:
        if (threshold, default_left, gain, lg, lh, rg, rh) != (-1, False, 0, 0, 0, 0, 0):
            return "no split, but threshold/default_left/gain/sums are not -1/False/0/0", 0.0
        if strict.any():
            return f"no split, but a valid split of gain {float(c.gain[m][strict].max()):.9g} exists", math.inf
        return "", 0.0
    F, T = c.gain.shape[1], c.gain.shape[2]
    if not (0 <= feature < F and 0 <= threshold < T):
        return f"split (feature {feature}, threshold {threshold}) out of range (F={F}, thresholds 0..{T - 1})", math.inf
    at = (feature, threshold, int(bool(default_left)))
    true_gain, tol = float(c.gain[m][at]), float(c.tol_gain[m][at])
    want = (c.gl[m][at], c.hl[m][at], c.gp[m] - c.gl[m][at], hr[at])
    for name, got, exp, t in zip(("left_grad", "left_hess", "right_grad", "right_hess"), (lg, lh, rg, rh), want,
                                 (c.tol_g[m], tol_h) * 2):
        if not abs(got - exp) <= t:
            return f"{name} {got!r} differs from its split's float64 sum {float(exp)!r} by more than {t:.3g}", abs(got - exp)
    if not abs(gain - true_gain) <= tol:
        return (f"reported gain {gain!r} differs from its split's float64 gain {true_gain!r} by more than {tol:.3g}",
                abs(gain - true_gain))
    if not (hl[at] >= mcw - tol_h and hr[at] >= mcw - tol_h and true_gain > gamma - tol):
        return (f"split (feature {feature}, threshold {threshold}, default_left {default_left}) is not valid: "
                f"hessians {float(hl[at]):.6g}/{float(hr[at]):.6g}, gain {true_gain:.6g}"), math.inf
    if strict.any():
        i = np.argmax(np.where(strict, c.gain[m] - c.tol_gain[m], -np.inf))
        best, best_tol = float(c.gain[m].flat[i]), float(c.tol_gain[m].flat[i])
        if not true_gain + tol >= best - best_tol:
            f, t, d = np.unravel_index(i, c.gain[m].shape)
            return (f"split (feature {feature}, threshold {threshold}) has gain {true_gain:.9g}, below the gain "
                    f"{best:.9g} of (feature {f}, threshold {t}, default_left {bool(d)}) by more than the tolerance "
                    f"{tol + best_tol:.3g}"), best - true_gain
    return "", 0.0


def _compare(out: Any, ref: Any, sample: Sample) -> Verdict:
    c = _candidates(sample)
    got = [t.detach().cpu().numpy() for t in out]
    worst = float(np.max(np.abs(got[3] - ref.gain.detach().cpu().numpy()), initial=0.0))
    for m in range(sample.attrs["num_nodes"]):
        problem, err = _node_problem(m, c, got, sample.attrs)
        if problem:
            return Verdict(ok=False, max_error=max(err, worst), reason=f"node {m}: {problem}")
    return Verdict(ok=True, max_error=worst)


SPEC = OpSpec(
    name=NAME,
    summary="Best split of every tree node from gradient and hessian histograms, XGBoost hist style",
    inputs=("bins", "grad", "hess", "node_ids"),
    attrs=(
        Attr(name="num_nodes", default=REQUIRED, doc="node ids are in [-1, num_nodes); one result per node"),
        Attr(name="num_bins", default=255, doc="bins are in [0, num_bins) or 255 = missing; at most 255"),
        Attr(name="reg_lambda", default=1.0, doc="L2 regularization, added to every hessian sum"),
        Attr(name="reg_alpha", default=0.0, doc="L1 regularization, soft-thresholds every gradient sum"),
        Attr(name="gamma", default=0.0, doc="a split is valid only when its gain is above gamma"),
        Attr(name="min_child_weight", default=1.0, doc="a split is valid only when both hessian sums reach it"),
    ),
    verify=_verify,
    key=_key,
    key_sizes=(3, 4, 5),
    device=_device,
    dtypes=_dtypes,
    infer=_infer,
    shrink=_shrink,
    synthesize=_synthesize,
    fits_reference=_fits_reference,
    compare=_compare,
    cases=CASES,
    edge_cases=EDGE_CASES,
)
