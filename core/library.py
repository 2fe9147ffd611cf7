"""The torch.library custom ops: ``torch.ops.switchyard.<op>`` for every op, and the dispatcher's compiled path.

Each op is one opaque node in a compiled graph. Its fake implementation is the spec's ``verify`` (the
checks that read no values) and ``infer`` (shapes and dtypes, symbolic sizes included), so the spec
stays the one definition of the outputs; its real implementation is the dispatcher's ``_dispatch`` on
the real tensors, so selection, validation, timing, forced backends and the data-reading checks all
happen at run time, per call, exactly as in eager mode.

Eager calls of ``dispatcher.<op>`` never come here (the custom-op boundary costs about 15 us a call);
``compiled_call`` is what they take while Dynamo traces them. Bad input never raises while tracing
(Dynamo would turn any exception into its own error, and a ``fullgraph=True`` compile would fail with
it): the graph is built and the op raises the spec's ``InvalidInput`` when it runs, on every call, from
the same graph (no recompile).

Outputs are fresh contiguous tensors (never an input, never a view of one), flat in the schema;
``compiled_call`` rebuilds the spec's records (``CastResult``, ``KnnResult``, ...) around them.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, Sequence

import torch

import core.dispatcher  # noqa: F401  (loaded first; it imports this module at its end)
from core.errors import InvalidInput

dispatcher = sys.modules["core.dispatcher"]  # not core.dispatcher: core's lazy __getattr__ would recurse mid-import

NS = "switchyard"
_SPECS = dispatcher._SPECS


# -- the real and fake implementations, shared by every op ------------------------------------------

def _storages(inputs: Sequence[Any]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}


def _fresh(out: torch.Tensor, taken: set[int]) -> torch.Tensor:
    """``out`` as the op's schema promises it: contiguous, detached, sharing no memory with an input or an
    earlier output (``taken``, which it extends). Each step only where needed: a compiled graph pays
    this at every run."""
    t = out.detach() if out.requires_grad else out
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel():
        where = t.untyped_storage().data_ptr()
        if where in taken:
            t = t.clone()
            where = t.untyped_storage().data_ptr()
        taken.add(where)  # nor with another output (a kernel may return views of one buffer)
    return t


_set_grad = torch._C._set_grad_enabled  # torch.no_grad() as a context costs about 1 us a call


def _dispatch_no_grad(name: str, args: tuple[Any, ...], attrs: dict[str, Any]) -> Any:
    """``dispatcher._dispatch`` with autograd recording off, as ``torch.no_grad()`` without its context."""
    was = torch.is_grad_enabled()
    _set_grad(False)
    try:
        return dispatcher._dispatch(_SPECS[name], args, attrs)
    finally:
        _set_grad(was)


def _real(name: str, args: tuple[Any, ...], attrs: dict[str, Any], inputs: Sequence[Any]) -> list[torch.Tensor]:
    out = _dispatch_no_grad(name, args, attrs)
    taken = _storages(inputs)
    return [_fresh(t, taken) for t in _leaves(out)]


def _leaves(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _fake(name: str, args: tuple[Any, ...], attrs: dict[str, Any], count: int) -> list[torch.Tensor]:
    """Empty outputs as the spec's ``infer`` describes them. No ``verify`` here: the real implementation
    verifies every call when the graph runs and raises the spec's error then (raising while tracing would
    reach the user as Dynamo's error, not InvalidInput), and the checks would add shape guards (a
    bucketed size is a specialization) that recompile each new length. Where ``infer`` cannot describe
    the outputs of an invalid input, ``count`` empty float32 tensors stand in: the run raises first."""
    spec = _SPECS[name]
    full = dict(attrs)
    device = next((a.device for a in _flat_tensors(args)), torch.device("cpu"))
    try:
        metas = _leaves(spec.infer(args, full))
    except Exception:  # the input is invalid and its outputs have no shape: the run raises first
        metas = []
    if len(metas) != count:
        return [torch.empty(0, device=device) for _ in range(count)]
    return [torch.empty(m.shape, dtype=m.dtype, device=device) for m in metas]


def _flat_tensors(args: Sequence[Any]) -> list[torch.Tensor]:
    flat: list[torch.Tensor] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            flat.append(a)
        elif isinstance(a, (list, tuple)):
            flat.extend(t for t in a if isinstance(t, torch.Tensor))
    return flat


_LIB = torch.library.Library(NS, "DEF")  # the ops live as long as this object: the module keeps it


def _define(name: str, schema: str, real: Callable[..., Any], fake: Callable[..., Any]) -> Any:
    """One op through torch.library's low-level registration: the schema, ``real`` for every device
    (CompositeExplicitAutograd: below autograd) and ``fake``. torch.library.custom_op registers the same
    behind Python layers of its own that cost about 8 us a call, paid at every run of a compiled graph."""
    _LIB.define(name + schema)
    _LIB.impl(name, real, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NS}::{name}", fake, lib=_LIB)
    return getattr(torch.ops.switchyard, name).default


# -- attention: forward and backward ops, autograd between them -------------------------------------

_ATTENTION = ("(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool causal, float? scale, bool return_lse, "
              "bool needs_grad) -> (Tensor, Tensor)")


def _attention_real(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool,
                    scale: float | None, return_lse: bool, needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    attrs = {"causal": causal, "scale": scale, "attn_mask": attn_mask, "return_lse": return_lse}
    # needs_grad: the eager call would have required grad, so the key is the same "grad" key and the
    # kernel the same differentiable one (the forward values equal eager's, not just a valid kernel's).
    if needs_grad:  # below the autograd keys here: recording back on, as the tuner validates gradients
        with torch.enable_grad(), _autograd_on():
            leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
            out = dispatcher._dispatch(_SPECS["attention"], leaves, attrs)
    else:
        out = _dispatch_no_grad("attention", (q, k, v), attrs)
    o, lse = out if return_lse else (out, torch.empty(0, dtype=torch.float32, device=q.device))
    taken = _storages((q, k, v, attn_mask))
    return _fresh(o, taken), _fresh(lse, taken)


def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool,
                    scale: float | None, return_lse: bool, needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    attrs = {"causal": causal, "scale": scale, "attn_mask": attn_mask, "return_lse": return_lse}
    out = _fake("attention", (q, k, v), attrs, 2 if return_lse else 1)
    return out[0], (out[1] if return_lse else torch.empty(0, dtype=torch.float32, device=q.device))


def _autograd_on() -> Any:
    """Autograd recording inside an op's implementation, which runs below the autograd dispatch keys."""
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for key in (C.DispatchKey.AutogradCPU, C.DispatchKey.AutogradCUDA, C.DispatchKey.AutogradOther,
                C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)
    return C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude)


_ATTENTION_BWD = ("(Tensor grad_o, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool causal, "
                  "float? scale) -> (Tensor, Tensor, Tensor)")


def _attention_bwd_real(grad_o: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool,
                        scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute the forward with the differentiable kernel the grad key chooses and take its gradients
    (the kernels expose their backward through autograd only; a compiled graph saves q, k, v, not the
    kernel's own residuals)."""
    attrs = {"causal": causal, "scale": scale, "attn_mask": attn_mask, "return_lse": grad_lse is not None}
    with torch.enable_grad(), _autograd_on():
        leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
        out = dispatcher._dispatch(_SPECS["attention"], leaves, attrs)
        outs, grads = ([out[0], out[1]], [grad_o, grad_lse]) if grad_lse is not None else ([out], [grad_o])
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True) \
            if pairs else (None, None, None)
    return tuple(torch.zeros_like(t) if g is None else g.detach().contiguous().clone()  # type: ignore[return-value]
                 for g, t in zip(got, (q, k, v)))


def _attention_bwd_fake(grad_o: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool,
                        scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


attention_op = _define("attention", _ATTENTION, _attention_real, _attention_fake)
attention_backward_op = _define("attention_backward", _ATTENTION_BWD, _attention_bwd_real, _attention_bwd_fake)


def _attention_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    q, k, v, attn_mask, causal, scale, return_lse, _ = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.causal, ctx.scale, ctx.return_lse = causal, scale, return_lse


def _attention_backward(ctx: Any, grad_o: torch.Tensor, grad_lse: torch.Tensor) -> tuple[Any, ...]:
    q, k, v, attn_mask = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad_o, grad_lse if ctx.return_lse else None, q, k, v, attn_mask,
                                       ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd(f"{NS}::attention", _attention_backward, setup_context=_attention_setup, lib=_LIB)


# -- the other ops ---------------------------------------------------------------------------------

def _precision_cast_real(x: torch.Tensor, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool,
                         margin: int, seed: int | None) -> list[torch.Tensor]:
    attrs = {"dtype": dtype, "rounding": rounding, "scaling": scaling, "saturate": saturate, "margin": margin,
             "seed": seed}
    return _real("precision_cast", (x,), attrs, (x,))


def _precision_cast_fake(x: torch.Tensor, dtype: torch.dtype, rounding: str, scaling: str, saturate: bool,
                         margin: int, seed: int | None) -> list[torch.Tensor]:
    attrs = {"dtype": dtype, "rounding": rounding, "scaling": scaling, "saturate": saturate, "margin": margin,
             "seed": seed}
    return _fake("precision_cast", (x,), attrs, 4)


precision_cast_op = _define(
    "precision_cast", "(Tensor x, ScalarType dtype, str rounding, str scaling, bool saturate, int margin, int? seed) "
    "-> (Tensor, Tensor, Tensor, Tensor)", _precision_cast_real, _precision_cast_fake)

_SPLIT_ATTRS = ("num_nodes", "num_bins", "reg_lambda", "reg_alpha", "gamma", "min_child_weight")


def _split_real(bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor, node_ids: torch.Tensor, *values: Any
                ) -> list[torch.Tensor]:
    args = (bins, grad, hess, node_ids)
    return _real("split_finding", args, dict(zip(_SPLIT_ATTRS, values)), args)


def _split_fake(bins: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor, node_ids: torch.Tensor, *values: Any
                ) -> list[torch.Tensor]:
    return _fake("split_finding", (bins, grad, hess, node_ids), dict(zip(_SPLIT_ATTRS, values)), 8)


split_finding_op = _define(
    "split_finding", "(Tensor bins, Tensor grad, Tensor hess, Tensor node_ids, int num_nodes, int num_bins, "
    "float reg_lambda, float reg_alpha, float gamma, float min_child_weight) -> (Tensor, Tensor, Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor)", _split_real, _split_fake)


def _knn_real(queries: torch.Tensor, database: torch.Tensor, k: int, metric: str) -> list[torch.Tensor]:
    return _real("nearest_neighbor", (queries, database), {"k": k, "metric": metric}, (queries, database))


def _knn_fake(queries: torch.Tensor, database: torch.Tensor, k: int, metric: str) -> list[torch.Tensor]:
    return _fake("nearest_neighbor", (queries, database), {"k": k, "metric": metric}, 2)


nearest_neighbor_op = _define("nearest_neighbor", "(Tensor queries, Tensor database, int k, str metric) -> (Tensor, Tensor)",
                              _knn_real, _knn_fake)

_DECODE_ATTRS = ("draft_probs", "rule", "temperature", "posterior_threshold", "posterior_alpha")


def _decode_real(draft_tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor, *values: Any
                 ) -> list[torch.Tensor]:
    args = (draft_tokens, parents, target_logits)
    attrs = {**dict(zip(_DECODE_ATTRS, values)), "generator": None}
    return _real("decode_step", args, attrs, (*args, values[0]))


def _decode_fake(draft_tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor, *values: Any
                 ) -> list[torch.Tensor]:
    attrs = {**dict(zip(_DECODE_ATTRS, values)), "generator": None}
    return _fake("decode_step", (draft_tokens, parents, target_logits), attrs, 3)


decode_step_op = _define(
    "decode_step", "(Tensor draft_tokens, Tensor parents, Tensor target_logits, Tensor? draft_probs, str rule, "
    "float temperature, float posterior_threshold, float posterior_alpha) -> (Tensor, Tensor, Tensor)",
    _decode_real, _decode_fake)


def _all_reduce_real(tensors: list[torch.Tensor], op: str, group_name: str | None) -> list[torch.Tensor]:
    group = None
    if group_name is not None:
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(group_name)
    out = _real("all_reduce", (list(tensors),), {"op": op, "group": group}, tensors)
    return out


def _all_reduce_fake(tensors: list[torch.Tensor], op: str, group_name: str | None) -> list[torch.Tensor]:
    return [t.new_empty(t.shape) for t in tensors]


all_reduce_op = _define("all_reduce", "(Tensor[] tensors, str op, str? group_name) -> Tensor[]",
                        _all_reduce_real, _all_reduce_fake)


def _invalid_real(inputs: list[torch.Tensor], message: str) -> torch.Tensor:
    raise InvalidInput(message)


def _invalid_fake(inputs: list[torch.Tensor], message: str) -> torch.Tensor:
    return torch.empty(0)


invalid_call_op = _define("invalid_call", "(Tensor[] inputs, str message) -> Tensor", _invalid_real, _invalid_fake)
torch.fx.node.has_side_effect(torch.ops.switchyard.invalid_call.default)  # never dead-code eliminated



# -- the traced side: what dispatcher.<op>(...) does while Dynamo compiles it ------------------------
# Plain Python on the call's constants (no exception is raised here: a problem becomes an
# invalid_call node that raises InvalidInput at run time), then one custom-op call.

def _show(value: Any) -> str:
    return repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__


def _is_bool(v: Any) -> bool:
    return v.__class__ is bool


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and v.__class__ is not bool


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and v.__class__ is not bool


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


# What each attribute must be to enter the op's schema; anything else is rejected before the call.
_ATTR_TYPES: dict[str, dict[str, tuple[str, Callable[[Any], bool]]]] = {
    "attention": {"causal": ("a bool", _is_bool), "scale": ("a finite float or None", _opt(_is_number)),
                  "attn_mask": ("a torch.Tensor or None", _opt(_is_tensor)), "return_lse": ("a bool", _is_bool)},
    "precision_cast": {"dtype": ("a torch.dtype", lambda v: isinstance(v, torch.dtype)),
                       "rounding": ("a str", _is_str), "scaling": ("a str", _is_str), "saturate": ("a bool", _is_bool),
                       "margin": ("an int", _is_int), "seed": ("None or an int", _opt(_is_int))},
    "split_finding": {"num_nodes": ("an int", _is_int), "num_bins": ("an int", _is_int),
                      **{n: ("a finite float >= 0", _is_number)
                         for n in ("reg_lambda", "reg_alpha", "gamma", "min_child_weight")}},
    "nearest_neighbor": {"k": ("an int", _is_int), "metric": ("a str", _is_str)},
    "decode_step": {"draft_probs": ("a torch.Tensor or None", _opt(_is_tensor)), "rule": ("a str", _is_str),
                    "temperature": ("a finite float >= 0", _is_number),
                    "posterior_threshold": ("a finite float >= 0", _is_number),
                    "posterior_alpha": ("a finite float >= 0", _is_number),
                    "generator": ("None inside torch.compile (a torch.Generator cannot enter a compiled graph; "
                                  "seed torch's default generator with torch.manual_seed instead)",
                                  lambda v: v is None)},
}

_SIGNATURES = {name: (spec.inputs, frozenset(spec.attr_names), dict(spec._defaults), spec._required)
               for name, spec in _SPECS.items()}


def _bind(name: str, args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """``spec.bind`` and the schema's type checks, returning the problem as text instead of raising."""
    inputs, known, defaults, required = _SIGNATURES[name]
    if len(args) > len(inputs):
        return (f"{name}: expected {len(inputs)} positional inputs ({', '.join(inputs)}), got {len(args)}; "
                f"attributes are keyword-only"), args, {}
    rest = dict(attrs)
    filled = list(args)
    for arg in inputs[len(args):]:
        if arg not in rest:
            return f"{name}: argument {arg!r}: expected a value, got nothing", args, {}
        filled.append(rest.pop(arg))
    for arg in rest:
        if arg not in known:
            return f"{name}: argument {arg!r}: expected one of the attributes {sorted(known)}, got an unknown keyword", \
                args, {}
    full = {**defaults, **rest}
    for arg in required:
        if arg not in full:
            return f"{name}: argument {arg!r}: expected a value (it is required), got nothing", args, {}
    if name != "all_reduce":
        for arg, value in zip(inputs, filled):
            if not isinstance(value, torch.Tensor):
                return f"{name}: argument {arg!r}: expected a torch.Tensor, got {_show(value)}", tuple(filled), full
    for arg, (expected, ok) in _ATTR_TYPES.get(name, {}).items():
        if not ok(full[arg]):
            return f"{name}: argument {arg!r}: expected {expected}, got {_show(full[arg])}", tuple(filled), full
    return "", tuple(filled), full


def _call_attention(args: tuple[Any, ...], a: dict[str, Any]) -> Any:
    q, k, v = args
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    scale = None if a["scale"] is None else float(a["scale"])
    o, lse = torch.ops.switchyard.attention(q, k, v, a["attn_mask"], a["causal"], scale, a["return_lse"], needs_grad)
    return (o, lse) if a["return_lse"] else o


# The ops other than attention have no gradient, as in eager calls (whose kernels detach): their inputs
# go in detached, so the op's outputs never require grad and autograd never meets it.
def _detached(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)


def _call_precision_cast(args: tuple[Any, ...], a: dict[str, Any]) -> Any:
    from core.ops.precision_cast import CastResult

    out = torch.ops.switchyard.precision_cast(*_detached(args), a["dtype"], a["rounding"], a["scaling"],
                                              a["saturate"], a["margin"], a["seed"])
    return CastResult(*out)


def _call_split_finding(args: tuple[Any, ...], a: dict[str, Any]) -> Any:
    from core.ops.split_finding import SplitResult

    out = torch.ops.switchyard.split_finding(*_detached(args), a["num_nodes"], a["num_bins"],
                                             float(a["reg_lambda"]), float(a["reg_alpha"]), float(a["gamma"]),
                                             float(a["min_child_weight"]))
    return SplitResult(*out)


def _call_nearest_neighbor(args: tuple[Any, ...], a: dict[str, Any]) -> Any:
    from core.ops.nearest_neighbor import KnnResult

    return KnnResult(*torch.ops.switchyard.nearest_neighbor(*_detached(args), a["k"], a["metric"]))


def _call_decode_step(args: tuple[Any, ...], a: dict[str, Any]) -> Any:
    from core.ops.decode_step import DecodeResult

    probs = a["draft_probs"]
    out = torch.ops.switchyard.decode_step(*_detached(args), None if probs is None else probs.detach(), a["rule"],
                                           float(a["temperature"]), float(a["posterior_threshold"]),
                                           float(a["posterior_alpha"]))
    return DecodeResult(*out)


ALL_REDUCE_EAGER_ONLY = (
    "all_reduce is eager-only under torch.compile: its dispatch runs collectives the compiler cannot see (the "
    "ranks' call check in verify and, on a new key, lockstep tuning), so inside a graph it would be an opaque "
    "node that Inductor may reorder against the graph's other collectives, and ranks whose graphs differ "
    "(a recompile or graph break on one rank only) would desynchronize; use torch.distributed's functional "
    "collectives inside compiled code, or call dispatcher.all_reduce outside it")


def _all_reduce_eager(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> Any:
    return dispatcher._dispatch(_SPECS["all_reduce"], args, dict(attrs))


_all_reduce_outside = torch.compiler.disable(_all_reduce_eager, reason=ALL_REDUCE_EAGER_ONLY)

_CALLS: dict[str, Callable[[tuple[Any, ...], dict[str, Any]], Any]] = {
    "attention": _call_attention,
    "precision_cast": _call_precision_cast,
    "split_finding": _call_split_finding,
    "nearest_neighbor": _call_nearest_neighbor,
    "decode_step": _call_decode_step,
}
_OUTPUTS = {"attention": 1, "precision_cast": 4, "split_finding": 8, "nearest_neighbor": 2, "decode_step": 3}


def _rejected(name: str, args: tuple[Any, ...], message: str) -> Any:
    """A graph node that raises ``InvalidInput(message)`` when it runs, standing in for the op's outputs
    (the call fails before any of them could be used)."""
    placeholder = torch.ops.switchyard.invalid_call(_flat_tensors(args), message)
    n = _OUTPUTS.get(name, 1)
    return placeholder if n == 1 else tuple(placeholder for _ in range(n))


def compiled_call(name: str, args: tuple[Any, ...], attrs: Mapping[str, Any]) -> Any:
    """``dispatcher.<name>(*args, **attrs)`` while Dynamo traces it: one custom-op node (all_reduce: a graph
    break, an error under ``fullgraph=True``)."""
    if name == "all_reduce":
        return _all_reduce_outside(args, attrs)
    problem, args, full = _bind(name, args, attrs)
    if problem:
        return _rejected(name, args, problem)
    return _CALLS[name](args, full)
