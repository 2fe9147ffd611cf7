"""all_reduce: every rank of a process group gets the elementwise reduction of every rank's tensors.

``tensors`` is one tensor or a list (or tuple) of tensors of any shapes, float16, bfloat16, float32,
float64, int32 or int64, mixed within a list; the result has the same structure, in new contiguous
tensors (the inputs are left unchanged). ``op`` is sum, avg, max, min or prod; avg of integers is
rejected. ``group`` is a ``torch.distributed`` process group; None means the default group when
torch.distributed is initialized and otherwise a world of one, whose result equals the input. Every
rank must pass the same structure (count, shapes, dtypes, op): verify checks that with one small
collective and raises ``InvalidInput`` on every rank, naming the first difference, instead of hanging
(except on a group whose owner vouched that its calls are the same on every rank,
``core.distributed.vouch``: the DDP hooks' private groups).
Every rank gets bitwise identical results. Not differentiable: the outputs do not require grad.

Compare rule (n ranks; u = eps/2, the dtype's unit roundoff; tau, its smallest subnormal; u64 = 2^-53):

- integers, max and min: exact (integer overflow wraps, as two's complement arithmetic does);
- sum and avg: |out - R| <= ((n + 2) u + n u64) S + n tau elementwise, where R is the float64 result
  and S = sum over ranks of |x_r| (divided by n for avg). Rounding R once to the dtype costs u S;
  accumulating n contributions in the dtype, in any order or tree, at most (n - 1) u S; avg's
  scaling of each contribution by 1/n (divided, or multiplied by a rounded 1/n as NCCL's PreMulSum
  does) at most 2 u S; n u64 S is the float64 reference's own rounding (it matters for float64
  only); tau per contribution covers subnormals. Where S exceeds the dtype's largest finite value a
  partial sum may overflow, so the result may also be +-inf there;
- prod: |out - R| <= ((n + 1) u + n u64) |R| + tau, checked where no partial product can leave the
  normal range: the product over ranks of max(|x_r|, 1) is at most the largest finite value, and
  that of min(|x_r|, 1) at least the smallest normal (or R is 0);
- NaN and inf inputs: positions where S is not finite must equal R exactly (NaN matching NaN); with
  max and min a NaN contribution's result is not specified (library collectives differ).

The reference runs on ``oracle(sample)``: the floating tensors lifted to float64, followed by their
magnitudes (reduced with the same op, or for prod by the bounds above), so S is known to every rank
without a collective inside the compare rule.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import torch

from core import distributed
from core.errors import InvalidInput
from core.spec import Attr, OpSpec, Sample, TensorMeta, Verdict, bucket, dtype_name

NAME = "all_reduce"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64)
OPS = ("sum", "avg", "max", "min", "prod")
MAGNITUDE_SLACK = 2  # the "+ 2" of (n + 2) * u * S: the final rounding and avg's scaling (see above)
REFERENCE_ELEMENTS = 1 << 18  # up to this many elements in all, candidates are also validated at full size
U64 = 2.0**-53  # float64's unit roundoff: the reference's own rounding


def as_list(tensors: Any) -> list[torch.Tensor]:
    """The tensors of the argument as a list (one tensor becomes a list of one)."""
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def like_input(tensors: Any, outs: list[torch.Tensor]) -> Any:
    """``outs`` in the structure of the argument: a tensor, a list or a tuple."""
    if isinstance(tensors, torch.Tensor):
        return outs[0]
    return tuple(outs) if isinstance(tensors, tuple) else outs


# -- verify -------------------------------------------------------------------------------------------

def _verify_group(group: Any) -> Any:
    """The resolved group (None for a world of one), or InvalidInput; local, no communication."""
    if group is None:
        return distributed.resolve_group(None)
    import torch.distributed as dist

    if not distributed.initialized():
        raise InvalidInput(f"{NAME}: argument 'group': expected None (torch.distributed is not initialized, so the "
                           f"world is this process alone), got {type(group).__name__}")
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise InvalidInput(f"{NAME}: argument 'group': expected a process group this rank belongs to, got one it is "
                           f"not a member of (dist.new_group returns NON_GROUP_MEMBER on the other ranks)")
    if not isinstance(group, dist.ProcessGroup):
        raise InvalidInput(f"{NAME}: argument 'group': expected a torch.distributed ProcessGroup or None, "
                           f"got {type(group).__name__}")
    return group


def _local_problem(tensors: Any, op: Any, group: Any) -> str | None:
    """Why this rank's inputs break the contract, or None; reads no tensor data."""
    if not isinstance(tensors, (torch.Tensor, list, tuple)):
        return f"{NAME}: argument 'tensors': expected a tensor or a list of tensors, got {type(tensors).__name__}"
    items = as_list(tensors)
    for i, t in enumerate(items):
        where = "" if isinstance(tensors, torch.Tensor) else f" at index {i}"
        if not isinstance(t, torch.Tensor):
            return f"{NAME}: argument 'tensors': expected a list of tensors, got {type(t).__name__}{where}"
        if t.dtype not in DTYPES:
            return (f"{NAME}: argument 'tensors': expected dtype one of {[dtype_name(d) for d in DTYPES]}, "
                    f"got {dtype_name(t.dtype)}{where}")
        if t.layout != torch.strided:
            return f"{NAME}: argument 'tensors': expected a dense (strided) tensor, got layout {t.layout}{where}"
        if t.device.type != items[0].device.type:
            return (f"{NAME}: argument 'tensors': expected every tensor on device {items[0].device.type!r} "
                    f"(that of the first), got {t.device.type!r}{where}")
    if not isinstance(op, str) or op not in OPS:
        return f"{NAME}: argument 'op': expected one of {list(OPS)}, got {op!r}"
    if op == "avg":
        ints = [i for i, t in enumerate(items) if not t.is_floating_point()]
        if ints:
            return (f"{NAME}: argument 'op': expected 'sum', 'max', 'min' or 'prod' for integer tensors (their average "
                    f"is not an integer), got 'avg' with {dtype_name(items[ints[0]].dtype)} at index {ints[0]}")
    if items and distributed.backend(group) == "nccl" and items[0].device.type != "cuda":
        return (f"{NAME}: argument 'tensors': expected CUDA tensors for a nccl process group, "
                f"got {items[0].device.type!r} (use a gloo group for CPU tensors)")
    return None


def describe_call(tensors: Any, op: Any, problem: str | None) -> str:
    """This rank's call as every rank must agree on it (kind, count, shapes, dtypes, devices, op), as JSON."""
    if isinstance(tensors, (torch.Tensor, list, tuple)):
        kind = "tensor" if isinstance(tensors, torch.Tensor) else type(tensors).__name__
        items = [[list(t.shape), dtype_name(t.dtype), t.device.type] if isinstance(t, torch.Tensor) else type(t).__name__
                 for t in as_list(tensors)]
    else:
        kind, items = type(tensors).__name__, []
    return json.dumps({"problem": problem, "kind": kind, "count": len(items), "op": repr(op), "tensors": items})


def _first_difference(descriptions: Sequence[str]) -> str:
    """Name the first way the ranks' calls differ: an invalid call, then kind, count, op, each tensor."""
    calls = [json.loads(d) for d in descriptions]
    for r, c in enumerate(calls):
        if c["problem"]:
            return f"rank {r}'s call is invalid ({c['problem']})"
    base = calls[0]
    for r, c in enumerate(calls[1:], start=1):
        for field, what in (("kind", "a {}"), ("count", "{} tensors"), ("op", "op={}")):
            if c[field] != base[field]:
                return f"rank 0 passed {what.format(base[field])}, rank {r} passed {what.format(c[field])}"
        for i, (mine, theirs) in enumerate(zip(c["tensors"], base["tensors"])):
            if mine != theirs:
                return f"tensors[{i}] has {_pretty(theirs)} on rank 0, but {_pretty(mine)} on rank {r}"
    return "the ranks' calls differ"


def _pretty(item: Any) -> str:
    if not isinstance(item, list):
        return str(item)
    shape, dtype, device = item
    return f"shape {tuple(shape)} and dtype {dtype} (device {device})"


def _verify(args: tuple[Any, ...], attrs: dict[str, Any]) -> None:
    (tensors,) = args
    group = _verify_group(attrs["group"])
    attrs["group"] = group
    problem = _local_problem(tensors, attrs["op"], group)
    if distributed.world_size(group) > 1 and not distributed.vouched(group):
        # A rank whose call is wrong (or differs) must not leave the others waiting in a collective:
        # every rank takes part in this one check, and every rank raises the same error. (A group its
        # owner vouched for carries only calls that are the same on every rank: see distributed.vouch.)
        everyone = distributed.disagreement(describe_call(tensors, attrs["op"], problem), group)
        if everyone is not None:
            raise InvalidInput(f"{NAME}: argument 'tensors': expected the same call on every rank of the group "
                               f"(count, shapes, dtypes, op), got a difference: {_first_difference(everyone)}")
    if problem:
        raise InvalidInput(problem)


# -- key, device, dtypes, infer --------------------------------------------------------------------

def _key(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[Any, ...]:
    items = as_list(args[0])
    group = attrs["group"]
    dtypes = ",".join(sorted({dtype_name(t.dtype) for t in items}))
    nbytes = sum(t.numel() * t.element_size() for t in items)
    return (_device(args, attrs), distributed.world_size(group), distributed.backend(group), attrs["op"],
            bucket(len(items)), dtypes, bucket(nbytes))


def _device(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> str:
    items = as_list(args[0])
    return items[0].device.type if items else "cpu"


def _dtypes(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[torch.dtype, ...]:
    return tuple(dict.fromkeys(t.dtype for t in as_list(args[0])))


def _infer(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> Any:
    (tensors,) = args
    metas = [TensorMeta(shape=tuple(t.shape), dtype=t.dtype) for t in as_list(tensors)]
    return like_input(tensors, metas)


def _group(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> Any:
    return distributed.resolve_group(attrs["group"])


# -- samples ---------------------------------------------------------------------------------------

def random_values(gen: torch.Generator, shape: Sequence[int], dtype: torch.dtype, op: str, device: str) -> torch.Tensor:
    """Fresh values suited to ``op``: normal floats (prod: magnitudes in [0.5, 2)), integers that do not overflow."""
    shape = tuple(shape)
    if dtype.is_floating_point:
        if op == "prod":
            mag = torch.rand(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5
            sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
            return (mag * sign).to(device=device, dtype=dtype)
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    low, high = {"prod": (-3, 4), "sum": (-1000, 1001)}.get(op, (-(2**30), 2**30))
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(device=device, dtype=dtype)


def _fresh(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator, shapes: Sequence[tuple[int, ...]]) -> Sample:
    (tensors,) = args
    items = as_list(tensors)
    outs = [random_values(gen, shape, t.dtype, attrs["op"], t.device.type) for t, shape in zip(items, shapes)]
    return Sample(args=(like_input(tensors, outs),), attrs=dict(attrs))


def _fits_reference(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> bool:
    """The reference gathers every rank's tensors and reduces them in numpy: quick up to 2**18 elements."""
    return sum(t.numel() for t in as_list(args[0])) <= REFERENCE_ELEMENTS


def _synthesize(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator) -> Sample:
    return _fresh(args, attrs, gen, [tuple(t.shape) for t in as_list(args[0])])


def _small(shape: tuple[int, ...], limit: int = 300) -> tuple[int, ...]:
    """The shape with its dimensions cut down (keeping 0s and odd sizes) until it has at most ``limit`` elements."""
    dims = list(shape)
    while math.prod(dims) > limit:
        i = max(range(len(dims)), key=lambda j: dims[j])
        dims[i] = max(1, dims[i] // 2 + 1) if dims[i] > 2 else 1
    return tuple(dims)


def _shrink(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator) -> Sample:
    return _fresh(args, attrs, gen, [_small(tuple(t.shape)) for t in as_list(args[0])])


def _oracle(sample: Sample) -> Sample:
    """Floating tensors lifted to float64, then the magnitudes the compare rule's bound is made of."""
    (tensors,) = sample.args
    items = as_list(tensors)
    op = sample.attrs["op"]
    lifted = [t.detach().to(torch.float64) if t.is_floating_point() else t for t in items]
    extra: list[torch.Tensor] = []
    if op in ("sum", "avg", "prod"):
        for t in lifted:
            if t.is_floating_point():
                extra += _magnitudes(t, op)
    return Sample(args=(lifted + extra,), attrs=dict(sample.attrs), name=sample.name)


def _magnitudes(t: torch.Tensor, op: str) -> list[torch.Tensor]:
    a = t.abs()
    if op == "prod":
        return [a.clamp(min=1.0), a.clamp(max=1.0)]
    return [a]


# -- compare rule ----------------------------------------------------------------------------------

def _split_reference(sample: Sample, ref: Any) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """(float64 results per tensor, magnitude reductions per tensor) from the reference's output on the oracle."""
    items = as_list(sample.args[0])
    refs = as_list(ref)
    results, rest = refs[: len(items)], refs[len(items):]
    per = 2 if sample.attrs["op"] == "prod" else 1
    mags: list[list[torch.Tensor]] = []
    for t in items:
        if t.is_floating_point() and sample.attrs["op"] in ("sum", "avg", "prod"):
            mags.append(rest[:per])
            rest = rest[per:]
        else:
            mags.append([])
    return results, mags


def bound(dtype: torch.dtype, op: str, n: int, result: torch.Tensor,
          magnitudes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tolerance, where +-inf is allowed, where the position is checked) for one float tensor, in float64.

    ``result`` is the float64 reference R, ``magnitudes`` the reductions of |x| the oracle appended.
    The reference's own float64 rounding (n * U64 relative) is added, which matters only for float64.
    """
    info = torch.finfo(dtype)
    u = info.eps / 2
    tau = info.smallest_normal * info.eps
    if op == "prod":
        high, low = magnitudes
        checked = (high <= info.max) & ((low >= info.smallest_normal) | (result == 0))
        tol = ((n + 1) * u + n * U64) * result.abs() + tau
        return tol, torch.zeros_like(checked), checked
    (s,) = magnitudes
    tol = ((n + MAGNITUDE_SLACK) * u + n * U64) * s + n * tau
    return tol, torch.isfinite(s) & (s > info.max), torch.ones_like(s, dtype=torch.bool)


def _compare_one(out: torch.Tensor, want: torch.Tensor, mags: Sequence[torch.Tensor], op: str, n: int) -> tuple[float, str]:
    """(max error, why the first bad element is wrong, or "") for one tensor."""
    o = out.detach().cpu().reshape(-1)
    r = want.detach().cpu().reshape(-1)
    if o.numel() == 0:
        return 0.0, ""
    tol: torch.Tensor | None = None  # None: the result must be exact
    if not out.is_floating_point():  # in the integer dtype itself
        bad = o != r.to(o.dtype)
        diff = (o.to(torch.float64) - r.to(torch.float64)).abs()
    else:
        o, r = o.to(torch.float64), r.to(torch.float64)
        if op not in ("max", "min"):
            wide = [m.detach().cpu().to(torch.float64).reshape(-1) for m in mags]
            tol, may_overflow, checked = bound(out.dtype, op, n, r, wide)
            diff = (o - r).abs()
            if bool(((diff <= tol) & (tol < math.inf)).all()):  # the common case in a few passes; NaN, inf: below
                return float(diff.max()), ""
        same = (o == r) | (torch.isnan(o) & torch.isnan(r))
        diff = torch.where(same, 0.0, (o - r).abs()).nan_to_num(nan=math.inf)
        if op in ("max", "min"):
            bad = ~same & ~torch.isnan(r)  # a NaN contribution's result is not specified
            diff = torch.where(torch.isnan(r), 0.0, diff)
        else:
            assert tol is not None
            excused = ~checked | (may_overflow & torch.isinf(o))
            exact_only = ~torch.isfinite(tol)  # an inf or NaN contribution: only R itself will do
            bad = ~same & ~excused & (exact_only | (diff > tol))
            diff = torch.where(excused, 0.0, diff)
    if not bool(bad.any()):
        return float(diff.max()), ""
    i = int(bad.nonzero()[0, 0])
    rule = "it must be exact" if tol is None or not math.isfinite(float(tol[i])) else f"the bound is {float(tol[i]):.3g}"
    reference = "the float64 reference" if out.is_floating_point() else "the reference"
    return float(diff.max()), f"element {i}: got {o[i].item()!r}, {reference} gives {r[i].item()!r}; {rule}"


def _compare(out: Any, ref: Any, sample: Sample) -> Verdict:
    items = as_list(sample.args[0])
    op = sample.attrs["op"]
    n = distributed.world_size(sample.attrs["group"])
    results, mags = _split_reference(sample, ref)
    worst = 0.0
    for i, (t, o, r, m) in enumerate(zip(items, as_list(out), results, mags)):
        err, problem = _compare_one(o, r, m, op, n)
        worst = max(worst, err)
        if problem:
            return Verdict(ok=False, max_error=worst,
                           reason=f"tensors[{i}] ({dtype_name(t.dtype)}, op {op}, {n} ranks) {problem}")
    return Verdict(ok=True, max_error=worst)


# -- cases -----------------------------------------------------------------------------------------

def model_shapes() -> list[tuple[int, ...]]:
    """200 parameter shapes like a small model's (about 2M parameters): 40 blocks of two weight
    matrices, a bias and a norm."""
    shapes: list[tuple[int, ...]] = []
    for i in range(40):
        width = (64, 96, 128, 192)[i % 4]
        shapes += [(width, width), (width,), (4 * width, width // 2), (4 * width,), (width,)]
    return shapes


def _case(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype], op: str, *, single: bool = False,
          near: float | None = None, transpose: bool = False) -> Any:
    """A case factory: one tensor per shape, dtypes cycling; ``near``: positive values in [0.9, 1] * near;
    ``transpose``: non-contiguous views (the transpose of fresh tensors)."""
    def make(gen: torch.Generator, device: str) -> Sample:
        outs = []
        for i, shape in enumerate(shapes):
            dtype = dtypes[i % len(dtypes)]
            if near is not None:
                t = (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.1 + 0.9).mul(near).to(device=device, dtype=dtype)
            elif transpose:
                t = random_values(gen, shape[::-1], dtype, op, device).transpose(0, -1)
            else:
                t = random_values(gen, shape, dtype, op, device)
            outs.append(t)
        return Sample(args=(outs[0] if single else outs,), attrs={"op": op, "group": None})
    return make


F16_MAX = float(torch.finfo(torch.float16).max)

CASES = {
    "grads-200-mixed-f32": _case(model_shapes(), [torch.float32], "sum"),
    "f32-1m-sum": _case([(1 << 20,)], [torch.float32], "sum", single=True),
    "bf16-256k-avg": _case([(1 << 18,)], [torch.bfloat16], "avg", single=True),
    "i64-64k-max": _case([(1 << 16,)], [torch.int64], "max", single=True),
}

EDGE_CASES = {
    "shapes-17-f32": _case([(17,), (17, 17), (17, 17, 17)], [torch.float32], "sum"),
    "shapes-17-i32-prod": _case([(17,), (17, 17), (17, 17, 17)], [torch.int32], "prod"),
    "shapes-17-f64-min": _case([(17,), (17, 17), (17, 17, 17)], [torch.float64], "min"),
    "f16-near-overflow-avg": _case([(33,)], [torch.float16], "avg", single=True, near=F16_MAX),
    "f16-near-overflow-max": _case([(33,)], [torch.float16], "max", single=True, near=F16_MAX),
    "f16-overflowing-sum": _case([(33,)], [torch.float16], "sum", single=True, near=F16_MAX),
    "empty": _case([(0,), (3, 0)], [torch.float32, torch.int64], "sum"),
    "empty-list": _case([], [torch.float32], "sum"),
    "scalar-0d": _case([()], [torch.float64], "prod", single=True),
    "fewer-elements-than-ranks": _case([(1,), (2,), (3,)], [torch.float32, torch.int32, torch.bfloat16], "sum"),
    "non-contiguous": _case([(5, 7), (3, 4, 6)], [torch.float32, torch.int64], "max", transpose=True),
    "mixed-dtypes-prod": _case([(5,), (6,), (7,), (8,), (9,), (10,)], list(DTYPES), "prod"),
    "mixed-floats-avg": _case([(11,), (12,), (13,), (14,)], list(DTYPES[:4]), "avg"),
}


SPEC = OpSpec(
    name=NAME,
    summary="All-reduce a tensor or a list of tensors over a torch.distributed process group",
    inputs=("tensors",),
    attrs=(
        Attr(name="op", default="sum", doc="sum, avg, max, min or prod (avg: floating tensors only)"),
        Attr(name="group", default=None, doc="a torch.distributed process group; None: the default group, "
                                              "or a world of one when torch.distributed is not initialized"),
    ),
    verify=_verify,
    key=_key,
    key_sizes=(4, 6),
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
    group=_group,
    collective=True,
)
