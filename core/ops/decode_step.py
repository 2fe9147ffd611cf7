"""decode_step: speculative-decoding verification over a candidate tree (greedy, typical, rejection).

The candidates form a tree of T nodes shared by the batch (``parents[0] == -1``, ``0 <= parents[i] <
i``); node 0 is the last committed token, nodes 1..T-1 are draft tokens, and ``target_logits[b, i]``
is the target model's prediction after the path ending at node i. With ``p(i) = softmax(logits[b, i]
/ temperature)`` (one-hot at the argmax, lowest id on ties, when ``temperature == 0``), node ``i >= 1``
passes when its parent is on an accepted path and:

- ``greedy``: its token is the argmax of the parent's raw logits (lowest id on ties);
- ``typical`` (Medusa, Cai et al. 2024, section 2.3.1): ``p(parent)[token] > min(posterior_threshold,
  posterior_alpha * exp(-H(p(parent))))``, H the entropy in nats. At ``temperature == 0`` typical
  acceptance is greedy acceptance: a node passes exactly when its token is the parent's argmax, and the
  extra token is the argmax, as in Medusa's own code (``evaluate_posterior`` switches to greedy matching
  at temperature 0); the entropy threshold plays no part;
- ``rejection`` (speculative sampling; Leviathan et al. 2023, Chen et al. 2023): chains only; the
  token is accepted with probability ``min(1, p(x) / q(x))`` (``q(x) == 0``: rejected), and
  verification stops at the first rejection.

The accepted path is the deepest path of passing nodes from the root; among equally deep ones the one
with the highest sum of the target log-probabilities ``log p(parent)[token]`` of its tokens (summed
from the root down, in float64, each row's log-sum-exp from an exactly rounded sum of its terms, so
rows that are permutations of each other give equal log-probabilities and tie exactly); then the
lexicographically lowest sequence of node indices. After the accepted draft tokens comes one more
token: ``greedy``, the argmax at the last accepted node; ``typical``, a sample from p there (the
argmax at temperature 0); ``rejection``, on a rejection a sample from ``normalize(max(p - q, 0))`` at
the rejecting node's parent (from p when that residual has no mass, which only float rounding can
cause), otherwise a bonus sample from p at the last node.

Sampling is by inverse CDF with uniforms drawn up front by ``draw_uniforms`` (from ``generator``, or
torch's default generator of the data's device): for ``rejection`` column ``j - 1`` decides node j
and the last column draws the extra token; for ``typical`` one column draws the extra token.

Precondition, not checked: logits are finite or -inf (masked entries), with a finite value in every
row. Checking it costs one more pass over all B x T x V logits: even a bare ``amax`` (NaN propagates)
takes 20-50% of the fused kernel's whole step at V = 151,936 (one thread: 1.0 ms against 2.6 ms for a
Medusa tree of 64 at B = 1, 0.7 ms against 3.4 ms for a chain of 5 at B = 8). With NaN or +inf logits (or a
row of only -inf) the accepted path and the tokens are unspecified, but every kernel returns normally,
every emitted id lies in ``[0, V)`` (-1 only as padding) and ``accepted_nodes`` is a path of the tree.

Compare rule: ``greedy``, and ``typical`` at temperature 0, must match the reference exactly: the
accepted path (ties included: kernels whose float32 row statistics put two equally deep paths within
``TOL_REL`` of each other re-score them as the reference does), its tokens and the argmax extra token.
``typical`` above temperature 0 must match the reference's path too, with one allowance: a float32
kernel cannot reproduce a float64 acceptance decision that sits on a knife edge, so when a node's
margin ``p(token) - threshold`` is within ``TOL_REL`` of its threshold, the kernel's path must only be
valid (every node passes within tolerance, no definitely passing path is deeper, its sum within
tolerance of the best). Accepted tokens and the padding must match the path exactly; a sampled token
must lie in ``[0, V)`` with nonzero float64 target probability (for the residual, ``p >= q`` within
``TOL_REL``). ``rejection`` is checked for validity: the path is a prefix of the chain, accepted
tokens have ``p > 0`` and ``q > 0``, and no token with ``p >= q > 0`` (accepted with probability 1) is
rejected. The distribution of sampled tokens is the test suite's job.
``TOL_REL = 1e-4``: float32 sums over up to 151,936 terms carry a relative error near 1e-6 in
practice (``sqrt(V) * eps`` for a random walk of roundings, Higham 2002, section 4.2); the rest is
headroom.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch

from core.errors import InvalidInput, invalid
from core.spec import (Attr, OpSpec, Sample, TensorMeta, Verdict, bucket, device_type, dtype_name, reads_data,
                       require_tensor, unknown_size)

NAME = "decode_step"
RULES = ("greedy", "typical", "rejection")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TOL_REL = 1e-4
REFERENCE_LOGITS = 1 << 21  # up to B * T * V this large, candidates are also validated at full size
PROB_SUM_TOL = 1e-3  # |sum(q) - 1|: a float32 softmax over 151,936 entries, summed in another order


class DecodeResult(NamedTuple):
    """What one verification step emits, per batch row."""

    tokens: torch.Tensor  # int64 [B, D + 1]: accepted draft tokens, then one more token, padded with -1
    num_accepted: torch.Tensor  # int64 [B]: accepted draft tokens
    accepted_nodes: torch.Tensor  # int64 [B, D + 1]: the path's node indices starting with 0, padded with -1


# -- the tree ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Tree:
    """The structure of a candidate tree, derived once per distinct ``parents``."""

    parents: tuple[int, ...]
    depth: tuple[int, ...]  # of each node; the root has 0
    max_depth: int  # D: tokens and accepted_nodes have D + 1 columns
    is_chain: bool
    levels: tuple[tuple[int, ...], ...]  # the nodes at depth 1, 2, ..., D
    paths: tuple[tuple[int, ...], ...]  # root-to-node indices of each node
    lex_rank: tuple[int, ...]  # each node's path's rank in lexicographic order of all paths
    has_children: tuple[bool, ...]


@functools.lru_cache(maxsize=256)
def _parents_problem(parents: tuple[int, ...]) -> str | None:
    if parents[0] != -1:
        return f"parents[0] == -1 (node 0 is the root), got parents[0] = {parents[0]}"
    for i, p in enumerate(parents[1:], 1):
        if not 0 <= p < i:
            return f"0 <= parents[{i}] < {i} (every parent index below its child), got parents[{i}] = {p}"
    return None


@functools.lru_cache(maxsize=256)
def tree_of(parents: tuple[int, ...]) -> Tree:
    """The structure of a valid ``parents`` tuple (cached: a serving loop reuses a handful of trees)."""
    depth = [0] * len(parents)
    paths: list[tuple[int, ...]] = [(0,)]
    has_children = [False] * len(parents)
    for i, p in enumerate(parents[1:], 1):
        depth[i] = depth[p] + 1
        paths.append(paths[p] + (i,))
        has_children[p] = True
    max_depth = max(depth)
    levels = tuple(tuple(i for i, d in enumerate(depth) if d == level) for level in range(1, max_depth + 1))
    order = sorted(range(len(parents)), key=lambda i: paths[i])
    lex_rank = [0] * len(parents)
    for rank, i in enumerate(order):
        lex_rank[i] = rank
    is_chain = all(p == i - 1 for i, p in enumerate(parents[1:], 1))
    return Tree(parents=parents, depth=tuple(depth), max_depth=max_depth, is_chain=is_chain, levels=levels,
                paths=tuple(paths), lex_rank=tuple(lex_rank), has_children=tuple(has_children))


def tree(parents: torch.Tensor) -> Tree:
    """``tree_of`` for a ``parents`` tensor the spec has verified."""
    return tree_of(tuple(parents.tolist()))


def tree_attention_mask(parents: torch.Tensor) -> torch.Tensor:
    """Bool [T, T]: node i may attend node j exactly when j is i or an ancestor of i.

    Pass it (with the committed prefix's keys allowed in front) as ``attn_mask`` to
    ``dispatcher.attention`` to run the target model over the whole tree in one forward pass.
    """
    parents = require_tensor("tree_attention_mask", "parents", parents)
    if parents.dtype.is_floating_point or parents.dtype.is_complex or parents.dtype == torch.bool:
        raise invalid("tree_attention_mask", "parents", "an integer tensor of parent indices (dtype torch.int64, "
                      "as decode_step takes it)", f"dtype {parents.dtype}")
    if parents.dim() != 1 or parents.numel() == 0:
        raise invalid("tree_attention_mask", "parents", "a 1-D tensor [T] with T >= 1", f"shape {tuple(parents.shape)}")
    problem = _parents_problem(tuple(parents.tolist()))
    if problem:
        raise InvalidInput(f"tree_attention_mask: argument 'parents': expected {problem}")
    t = tree(parents)
    mask = torch.zeros(len(t.parents), len(t.parents), dtype=torch.bool)
    for i, path in enumerate(t.paths):
        mask[i, list(path)] = True
    return mask.to(parents.device)


def uniform_count(rule: str, temperature: float, T: int) -> int:
    """How many uniforms per batch row a rule consumes."""
    if rule == "rejection":
        return T  # one per draft node, one for the extra token
    if rule == "typical" and temperature > 0:
        return 1
    return 0


def draw_uniforms(generator: torch.Generator | None, rule: str, temperature: float, B: int, T: int,
                  device: torch.device) -> torch.Tensor:
    """Float64 [B, n] uniforms in [0, 1) on ``device``, drawn on the generator's own device."""
    n = uniform_count(rule, temperature, T)
    where = generator.device if generator is not None else device
    u = torch.rand((B, n), generator=generator, dtype=torch.float64, device=where)
    return u.to(device)


# -- verify ------------------------------------------------------------------------------------------

def _nonnegative(attrs: dict[str, Any], name: str) -> float:
    value = attrs[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise invalid(NAME, name, "a finite float >= 0", repr(value))
    attrs[name] = float(value)
    return float(value)


def _verify(args: tuple[Any, ...], attrs: dict[str, Any]) -> None:
    draft_tokens, parents, logits = args
    for arg, t in (("draft_tokens", draft_tokens), ("parents", parents), ("target_logits", logits)):
        require_tensor(NAME, arg, t)
    if logits.dim() != 3:
        raise invalid(NAME, "target_logits", "a 3-D tensor [B, T, V]", f"shape {tuple(logits.shape)}")
    if logits.dtype not in DTYPES:
        raise invalid(NAME, "target_logits", f"dtype one of {[dtype_name(d) for d in DTYPES]}", logits.dtype)
    B, T, V = logits.shape
    if T == 0 or V == 0:
        raise invalid(NAME, "target_logits", "at least one node (the root) and one vocabulary entry",
                      f"shape {tuple(logits.shape)}")
    if draft_tokens.dtype != torch.int64:
        raise invalid(NAME, "draft_tokens", "dtype torch.int64", draft_tokens.dtype)
    if tuple(draft_tokens.shape) != (B, T):
        raise invalid(NAME, "draft_tokens", f"shape [B, T] = [{B}, {T}] (the batch and node counts of target_logits)",
                      f"shape {list(draft_tokens.shape)}")
    if draft_tokens.device != logits.device:
        raise invalid(NAME, "draft_tokens", f"device {logits.device} (the device of target_logits)", draft_tokens.device)
    if parents.dtype != torch.int64:
        raise invalid(NAME, "parents", "dtype torch.int64", parents.dtype)
    if tuple(parents.shape) != (T,):
        raise invalid(NAME, "parents", f"shape [T] = [{T}] (the node count of target_logits)", f"shape {list(parents.shape)}")
    if parents.device.type not in ("cpu", logits.device.type):
        raise invalid(NAME, "parents", f"device cpu or {logits.device}", parents.device)
    data = reads_data(parents) and reads_data(draft_tokens) and reads_data(logits)
    problem = _parents_problem(tuple(parents.tolist())) if data else None
    if problem:
        raise InvalidInput(f"{NAME}: argument 'parents': expected {problem}")
    rule = attrs["rule"]
    if rule not in RULES:
        raise invalid(NAME, "rule", f"one of {list(RULES)}", repr(rule))
    temperature = attrs["temperature"]
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise invalid(NAME, "temperature", "a finite float >= 0 (0 means the argmax)", repr(temperature))
    attrs["temperature"] = float(temperature)
    _nonnegative(attrs, "posterior_threshold")
    _nonnegative(attrs, "posterior_alpha")
    generator = attrs["generator"]
    if generator is not None and not isinstance(generator, torch.Generator):
        raise invalid(NAME, "generator", "a torch.Generator or None", type(generator).__name__)
    if not data:  # traced (the real implementation checks the values at run time) or captured
        _verify_draft_probs(attrs, rule, logits, None)
        return
    if T > 1 and B > 0:
        drafts = draft_tokens[:, 1:]
        low, high = int(drafts.min()), int(drafts.max())
        if low < 0 or high >= V:
            raise invalid(NAME, "draft_tokens", f"token ids in [0, {V}) in columns 1..{T - 1} (V = {V})",
                          f"ids from {low} to {high}")
    _verify_draft_probs(attrs, rule, logits, parents)


def _verify_draft_probs(attrs: dict[str, Any], rule: str, logits: torch.Tensor, parents: torch.Tensor | None) -> None:
    q = attrs["draft_probs"]
    if q is None:
        if rule == "rejection":
            raise invalid(NAME, "draft_probs", "the draft distributions [B, T, V] (rule='rejection' needs them)", "None")
        return
    require_tensor(NAME, "draft_probs", q)
    if q.dtype not in DTYPES:
        raise invalid(NAME, "draft_probs", f"dtype one of {[dtype_name(d) for d in DTYPES]}", q.dtype)
    if q.shape != logits.shape:
        raise invalid(NAME, "draft_probs", f"shape {list(logits.shape)} (the shape of target_logits)", f"shape {list(q.shape)}")
    if q.device != logits.device:
        raise invalid(NAME, "draft_probs", f"device {logits.device} (the device of target_logits)", q.device)
    if rule != "rejection" or parents is None or not reads_data(q):
        return
    t = tree(parents)
    if not t.is_chain:
        i = next(i for i, p in enumerate(t.parents[1:], 1) if p != i - 1)
        raise InvalidInput(
            f"{NAME}: argument 'parents': expected a chain (parents[i] == i - 1) for rule='rejection', got "
            f"parents[{i}] = {t.parents[i]}: speculative sampling keeps the target's distribution for a single "
            f"draft sequence only; verify a tree with rule='typical' or rule='greedy'")
    rows = q[:, 1:]
    if rows.numel() == 0:
        return
    low = float(rows.amin())
    if not low >= 0:
        raise invalid(NAME, "draft_probs", "probabilities >= 0 in rows 1..T-1", f"a minimum of {low!r}")
    tol = max(PROB_SUM_TOL, float(torch.finfo(q.dtype).eps))  # bfloat16 rounds each entry by up to 2^-9
    if not _row_sums_within(rows, tol):
        err = float((rows.sum(-1, dtype=torch.float64) - 1).abs().max())
        raise invalid(NAME, "draft_probs", f"rows 1..T-1 summing to 1 within {tol:g}", f"a row sum off by {err:.3g}")


_SUM_CHUNK = 256  # entries summed in float32 before the float64 sum of the partial sums


def _row_sums_within(rows: torch.Tensor, tol: float) -> bool:
    """Whether every row's float64 sum is within ``tol`` of 1, as ``rows.sum(-1, dtype=torch.float64)``
    decides it, at the cost of a float32 sum: converting every entry to float64 made the check 7x
    slower than the fused kernel's whole rejection step. Partial sums of 256 entries in float32 err by
    at most 256 * 2^-24 of the row's sum (entries are >= 0 here, in any summation order; Higham 2002,
    section 4.2); only rows whose answer that could change are summed again in float64."""
    V = rows.shape[-1]
    if rows.dtype == torch.float64 or V < 2 * _SUM_CHUNK:
        return bool(((rows.sum(-1, dtype=torch.float64) - 1).abs() <= tol).all())
    head = V // _SUM_CHUNK * _SUM_CHUNK
    parts = rows[..., :head].unflatten(-1, (V // _SUM_CHUNK, _SUM_CHUNK)).sum(-1, dtype=torch.float32)
    sums = parts.sum(-1, dtype=torch.float64)
    if head < V:
        sums += rows[..., head:].sum(-1, dtype=torch.float64)
    slack = sums * ((_SUM_CHUNK + 1) * 2.0**-24) + 1e-30
    err = (sums - 1).abs()
    near = (err - tol).abs() <= slack
    if bool(near.any()):
        err[near] = (rows[near].sum(-1, dtype=torch.float64) - 1).abs()
    return bool((err <= tol).all())


# -- key, device, dtypes, infer ----------------------------------------------------------------------

def _key(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[Any, ...]:
    draft_tokens, parents, logits = args
    B, T, V = logits.shape
    q = attrs["draft_probs"]
    return (attrs["rule"], device_type(logits), str(logits.dtype), bucket(B), T, bucket(V), attrs["temperature"] == 0,
            tree(parents).is_chain, None if q is None else str(q.dtype))


def _device(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> str:
    return args[2].device.type


def _dtypes(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> tuple[torch.dtype, ...]:
    return (args[2].dtype,)


def _infer(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> Any:
    B, T = args[2].shape[:2]
    # The width is the tree's depth + 1, which only the values of parents tell.
    width = tree(args[1]).max_depth + 1 if reads_data(args[1]) else unknown_size(1, T)
    return DecodeResult(TensorMeta(shape=(B, width), dtype=torch.int64), TensorMeta(shape=(B,), dtype=torch.int64),
                        TensorMeta(shape=(B, width), dtype=torch.int64))


# -- samples -----------------------------------------------------------------------------------------

def medusa_tree(num_nodes: int, width: int = 10) -> list[int]:
    """``parents`` of a Medusa-style tree: the ``num_nodes - 1`` likeliest top-k continuations, each
    rank r at each depth weighted ``1 / (r + 2)``, ordered by depth then rank (like Medusa's choices)."""
    best: list[tuple[float, tuple[int, ...]]] = []
    frontier = [(1.0, ())]
    while frontier and len(best) < num_nodes - 1:
        frontier.sort(key=lambda c: (-c[0], c[1]))
        weight, choice = frontier.pop(0)
        if choice:
            best.append((weight, choice))
        frontier += [(weight / (r + 2), choice + (r,)) for r in range(width)]
    choices = sorted((c for _, c in best), key=lambda c: (len(c), c))
    index = {(): 0, **{c: i + 1 for i, c in enumerate(choices)}}
    return [-1] + [index[c[:-1]] for c in choices]


def chain(k: int) -> list[int]:
    """``parents`` of a chain of k drafts."""
    return list(range(-1, k))


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


def _draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of ``probs`` [..., V] by inverse CDF (torch.multinomial is slow at V = 151,936)."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(*probs.shape[:-1], 1, generator=gen, dtype=torch.float64) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True)[..., 0].clamp(max=probs.shape[-1] - 1)


def make_inputs(gen: torch.Generator, device: str, *, B: int, parents: list[int] | tuple[int, ...], V: int,
                rule: str = "greedy", temperature: float = 1.0, dtype: torch.dtype = torch.float32,
                agree: float = 0.8, scale: float = 3.0, posterior_threshold: float = 0.09,
                posterior_alpha: float = 0.3, q_dtype: torch.dtype = torch.float32) -> Sample:
    """Fresh random inputs where drafts often agree with the target, so every rule accepts some.

    Logits are ``scale * N(0, 1)``. The r-th child of a node proposes the parent's r-th likeliest
    token with probability ``agree``, else a uniform one; for ``rejection`` each node's draft
    distribution is a noisy softmax of its parent's logits and its token is drawn from it.
    """
    T = len(parents)
    logits = torch.randn(B, T, V, generator=gen) * scale
    par = torch.tensor(parents, dtype=torch.int64)
    draft_tokens = torch.randint(0, V, (B, T), generator=gen)
    draft_probs = None
    if rule == "rejection":
        t = max(temperature, 0.5)
        noisy = logits[:, par.clamp(min=0)] / t + torch.randn(B, T, V, generator=gen)
        q = torch.softmax(noisy, -1)
        if T > 1:
            draft_tokens[:, 1:] = _draw(q[:, 1:], gen)
        draft_probs = q.to(q_dtype).to(device)
    elif T > 1:
        rank = [0] * T
        seen: dict[int, int] = {}
        for i, p in enumerate(parents[1:], 1):
            rank[i] = seen.get(p, 0)
            seen[p] = rank[i] + 1
        k = min(V, max(rank) + 1)
        top = logits.topk(k, dim=-1).indices  # [B, T, k]
        ranks = torch.tensor(rank[1:]).clamp(max=k - 1)
        proposed = top[:, par[1:], ranks]  # [B, T - 1]
        keep = torch.rand(B, T - 1, generator=gen) < agree
        draft_tokens[:, 1:] = torch.where(keep, proposed, draft_tokens[:, 1:])
    attrs = {"draft_probs": draft_probs, "rule": rule, "temperature": temperature,
             "posterior_threshold": posterior_threshold, "posterior_alpha": posterior_alpha,
             "generator": torch.Generator().manual_seed(_seed(gen))}
    return Sample(args=(draft_tokens.to(device), par.to(device), logits.to(device=device, dtype=dtype)), attrs=attrs)


def _resample(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator, B: int, V: int) -> Sample:
    _, parents, logits = args
    q = attrs["draft_probs"]
    sample = make_inputs(gen, logits.device.type, B=B, parents=tree(parents).parents, V=V, rule=attrs["rule"],
                         temperature=attrs["temperature"], dtype=logits.dtype,
                         posterior_threshold=attrs["posterior_threshold"], posterior_alpha=attrs["posterior_alpha"],
                         q_dtype=torch.float32 if q is None else q.dtype)
    new = dict(sample.attrs)
    if q is not None and attrs["rule"] != "rejection":  # an unused draft_probs keeps the call's key
        new["draft_probs"] = torch.softmax(torch.randn(B, *logits.shape[1:], generator=gen), -1).to(q)
    return Sample(args=sample.args, attrs=new)


def _fits_reference(args: tuple[Any, ...], attrs: Mapping[str, Any]) -> bool:
    """The numpy reference (exact row sums included) verifies 2**21 logits in about 0.05 s."""
    return args[2].numel() <= REFERENCE_LOGITS


def _synthesize(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator) -> Sample:
    B, _, V = args[2].shape
    return _resample(args, attrs, gen, B, V)


def _shrink(args: tuple[Any, ...], attrs: Mapping[str, Any], gen: torch.Generator) -> Sample:
    B, _, V = args[2].shape
    return _resample(args, attrs, gen, min(B, 3), min(V, 1000))


def _case(B: int, parents: list[int], V: int, rule: str, **kw: Any) -> Any:
    def make(gen: torch.Generator, device: str) -> Sample:
        return make_inputs(gen, device, B=B, parents=parents, V=V, rule=rule, **kw)
    return make


def _ties_case(gen: torch.Generator, device: str) -> Sample:
    """Integer logits in [-2, 2]: most rows have several maxima; duplicate siblings tie at temperature 0."""
    parents = [-1, 0, 0, 0, 1, 2, 3, 4, 5]
    sample = make_inputs(gen, device, B=4, parents=parents, V=7, rule="greedy", temperature=0.0)
    draft_tokens, par, _ = sample.args
    logits = torch.randint(-2, 3, (4, len(parents), 7), generator=gen).float()
    draft_tokens = draft_tokens.clone()
    draft_tokens[:, 1:] = logits[:, par[1:].cpu()].argmax(-1).to(device)  # siblings 1, 2, 3 all propose the argmax
    return Sample(args=(draft_tokens, par, logits.to(device)), attrs=sample.attrs)


def _masked_vocab_case(gen: torch.Generator, device: str) -> Sample:
    """A padded vocabulary: the last quarter of every row is -inf."""
    sample = make_inputs(gen, device, B=2, parents=medusa_tree(12), V=400, rule="typical")
    draft_tokens, par, logits = sample.args
    logits = logits.clone()
    logits[..., 300:] = float("-inf")
    draft_tokens = draft_tokens.clone() % 300
    return Sample(args=(draft_tokens, par, logits), attrs=sample.attrs)


def _sparse_draft_case(gen: torch.Generator, device: str) -> Sample:
    """Top-k truncated draft distributions (zeros in q) and one row where the draft equals the target."""
    sample = make_inputs(gen, device, B=3, parents=chain(4), V=64, rule="rejection")
    draft_tokens, par, logits = sample.args
    q = sample.attrs["draft_probs"].clone()
    cut = q.topk(8, dim=-1).values[..., -1:]
    q = torch.where(q >= cut, q, torch.zeros_like(q))
    q = q / q.sum(-1, keepdim=True)
    q[2, 1:] = torch.softmax(logits[2, :-1].double(), -1).to(q)
    draft_tokens = draft_tokens.clone()
    draft_tokens[:, 1:] = _draw(q[:, 1:], gen).to(device)
    return Sample(args=(draft_tokens, par, logits), attrs={**sample.attrs, "draft_probs": q})


MEDUSA_64 = medusa_tree(64)

CASES = {
    "greedy-tree64-b2-v32000": _case(2, MEDUSA_64, 32000, "greedy"),
    "typical-tree64-b2-v32000": _case(2, MEDUSA_64, 32000, "typical", temperature=0.7),
    "rejection-chain5-b4-v32000": _case(4, chain(5), 32000, "rejection"),
    "greedy-chain5-b4-v151936": _case(4, chain(5), 151936, "greedy"),
}

EDGE_CASES = {
    "root-only": _case(3, [-1], 50, "greedy"),
    "v1": _case(2, chain(3), 1, "typical"),
    "empty-batch": _case(0, chain(2), 20, "greedy"),
    "ties-t0": _ties_case,
    "masked-vocab": _masked_vocab_case,
    "typical-t0": _case(3, medusa_tree(16), 300, "typical", temperature=0.0),
    "typical-hot": _case(3, medusa_tree(16), 300, "typical", temperature=2.5, posterior_threshold=0.3),
    "peaky": _case(3, medusa_tree(16), 300, "typical", scale=80.0),
    "greedy-deep-tree": _case(2, [-1, 0, 1, 2, 0, 4, 5, 6, 6, 1, 3, 9], 200, "greedy", agree=0.95),
    "rejection-t0": _case(3, chain(4), 100, "rejection", temperature=0.0),
    "rejection-k1": _case(5, chain(1), 100, "rejection", temperature=1.3),
    "rejection-sparse-draft": _sparse_draft_case,
    "rejection-bfloat16-q": _case(2, chain(3), 300, "rejection", q_dtype=torch.bfloat16),
    "float16": _case(2, medusa_tree(16), 300, "typical", dtype=torch.float16),
    "bfloat16": _case(2, chain(4), 300, "greedy", dtype=torch.bfloat16),
    "float64": _case(2, medusa_tree(16), 300, "typical", dtype=torch.float64),
    "rejection-float64": _case(2, chain(3), 300, "rejection", dtype=torch.float64, q_dtype=torch.float64),
}


# -- compare rule ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class _Exact:
    """Float64 quantities of one sample that a kernel's answer is judged by."""

    logits: torch.Tensor  # [B, T, V] on the CPU, as given
    temperature: float
    argmax: torch.Tensor  # [B, T] of the raw logits
    node_logp: torch.Tensor  # [B, T] log p(parent)[token], 0 at the root
    margin: torch.Tensor  # [B, T] how clearly a node passes (> 0) or fails (< 0), on its own
    slack: torch.Tensor  # [B, T] |margin| below which rounding may flip it (0: decided exactly)

    def logp(self, b: int, i: int) -> torch.Tensor:
        """Float64 [V]: log p(i) of batch row b (temperature 0: 0 at the argmax, -inf elsewhere)."""
        if self.temperature == 0:
            out = torch.full(self.logits.shape[-1:], float("-inf"), dtype=torch.float64)
            return out.index_fill_(0, self.argmax[b, i], 0.0)
        return exact_row(self.logits[b, i], self.temperature)


def exact(sample: Sample) -> _Exact:
    """The float64 evaluation of a sample's per-node decisions (for the compare rule and the tests)."""
    draft_tokens, parents, logits = sample.args
    a = sample.attrs
    x = logits.detach().cpu()
    tok = draft_tokens.cpu()
    par = parents.cpu().clamp(min=0)
    B, T, V = x.shape
    temperature = a["temperature"]
    argmax = x.argmax(-1)
    entropy = torch.zeros(B, T, dtype=torch.float64)
    if temperature > 0:
        node_logp = torch.zeros(B, T, dtype=torch.float64)
        children: dict[int, list[int]] = {}
        for child, parent in enumerate(tree(parents).parents[1:], 1):
            children.setdefault(parent, []).append(child)
        rows = x.double().numpy() if x.dtype == torch.float64 else None
        for parent, kids in children.items():  # only parents' distributions decide nodes
            for b in range(B):  # one row at a time, in numpy: small temporaries, no thread hand-offs
                logp = _log_softmax(rows[b, parent] if rows is not None else x[b, parent].double().numpy(), temperature)
                node_logp[b, kids] = torch.from_numpy(logp[tok[b, kids].clamp(0, V - 1).numpy()])
                if a["rule"] == "typical":
                    p = np.exp(logp)
                    entropy[b, parent] = float(-(p * np.where(p > 0, logp, 0.0)).sum())
    else:
        node_logp = torch.where(tok == argmax[:, par], 0.0, float("-inf")).double()
    node_logp[:, 0] = 0.0
    margin = torch.where(tok == argmax[:, par], 1.0, -1.0).double()
    slack = torch.zeros(B, T, dtype=torch.float64)
    if a["rule"] == "typical" and temperature > 0:
        thr = torch.clamp(a["posterior_alpha"] * torch.exp(-entropy), max=a["posterior_threshold"])[:, par]
        margin = node_logp.exp() - thr
        slack = TOL_REL * thr
    return _Exact(logits=x, temperature=temperature, argmax=argmax, node_logp=node_logp, margin=margin, slack=slack)


def _log_softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = (x - x.max()) / temperature
    return z - np.log(np.exp(z).sum())


def exact_row(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Float64 log softmax(x / temperature) of one row of logits."""
    return torch.from_numpy(_log_softmax(x.detach().cpu().double().numpy(), temperature))


def _unpack(out: Any) -> tuple[list[list[int]], list[list[int]], list[int]]:
    tokens, num, nodes = (t.detach().cpu() for t in out)
    return tokens.tolist(), nodes.tolist(), num.tolist()


def _path_of(row: list[int], t: Tree) -> tuple[int, ...] | str:
    """The node path an accepted_nodes row describes, or why it is not one."""
    n = next((j for j, v in enumerate(row) if v == -1), len(row))
    path = tuple(row[:n])
    if any(v != -1 for v in row[n:]):
        return f"accepted_nodes {row}: a node after the -1 padding"
    if not path or path[0] != 0:
        return f"accepted_nodes {row}: does not start at the root 0"
    for a, b in zip(path, path[1:]):
        if not 0 < b < len(t.parents) or t.parents[b] != a:
            return f"accepted_nodes {row}: {b} is not a child of {a}"
    return path


def _best_paths(alive: list[bool], score: list[float], t: Tree) -> tuple[int, dict[int, float]]:
    """Deepest alive depth, and the best alive score at each depth."""
    best: dict[int, float] = {}
    for i, ok in enumerate(alive):
        if ok:
            d = t.depth[i]
            best[d] = max(best.get(d, -math.inf), score[i])
    return max(best), best


def _judge_tree_path(b: int, path: tuple[int, ...], ref_path: tuple[int, ...], ex: _Exact, t: Tree) -> tuple[str | None, float]:
    """Why a tree rule's path for row b is wrong (None when it is right), and its score's distance."""
    margin, slack, lp = ex.margin[b].tolist(), ex.slack[b].tolist(), ex.node_logp[b].tolist()
    score = [0.0] * len(t.parents)
    sure, maybe = [True] * len(t.parents), [True] * len(t.parents)
    for i in range(1, len(t.parents)):
        p = t.parents[i]
        score[i] = score[p] + lp[i] if maybe[p] and margin[i] >= -slack[i] else -math.inf
        sure[i] = sure[p] and margin[i] > slack[i]
        maybe[i] = maybe[p] and margin[i] >= -slack[i]
    last, ref_last = path[-1], ref_path[-1]
    gap = abs(score[last] - score[ref_last]) if maybe[last] else math.inf
    if path == ref_path:
        return None, 0.0
    if not maybe[last]:
        return f"row {b}: accepted node {last} does not pass", gap
    ambiguous = any(abs(m) <= s and s > 0 for m, s in zip(margin[1:], slack[1:]))  # typical above temperature 0
    if not ambiguous:
        return f"row {b}: accepted path {list(path)}, the reference's is {list(ref_path)}", gap
    deepest_sure, best = _best_paths(sure, score, t)
    if t.depth[last] < deepest_sure:
        return f"row {b}: accepted path {list(path)} is shallower than a passing path of depth {deepest_sure}", gap
    sure_best = max((score[i] for i, ok in enumerate(sure) if ok and t.depth[i] == t.depth[last]), default=-math.inf)
    if score[last] < sure_best - TOL_REL * (1.0 + abs(sure_best)):
        return f"row {b}: accepted path {list(path)} scores {score[last]:.6g}, a passing path scores {sure_best:.6g}", gap
    return None, gap


def _judge_rejection(b: int, path: tuple[int, ...], extra: int, sample: Sample, ex: _Exact) -> str | None:
    draft_tokens, _, logits = sample.args
    q = sample.attrs["draft_probs"][b].detach().cpu().double()
    tok = draft_tokens[b].cpu().tolist()
    k = logits.shape[1] - 1
    n = len(path) - 1
    if path != tuple(range(n + 1)):
        return f"row {b}: accepted_nodes {list(path)} is not a prefix of the chain"
    for j in range(1, n + 1):
        x = tok[j]
        p = float(ex.node_logp[b, j].exp())
        if not (p > 0 and q[j, x] > 0):
            return f"row {b}: accepted node {j} (token {x}) has p = {p:.3g}, q = {float(q[j, x]):.3g}"
    p = ex.logp(b, n).exp()
    if n < k:
        x = tok[n + 1]
        if q[n + 1, x] > 0 and p[x] >= q[n + 1, x] * (1 + TOL_REL):
            return f"row {b}: node {n + 1} (token {x}) was rejected though p >= q (accepted with probability 1)"
        residual = (p - q[n + 1]).clamp(min=0)
        if float(residual.sum()) > TOL_REL and not p[extra] >= q[n + 1, extra] * (1 - TOL_REL):
            return (f"row {b}: extra token {extra} has p = {float(p[extra]):.3g} < q = {float(q[n + 1, extra]):.3g}, "
                    f"outside the residual max(p - q, 0)")
    if not p[extra] > 0:
        return f"row {b}: extra token {extra} has target probability 0 at node {n}"
    return None


def _compare(out: Any, ref: Any, sample: Sample) -> Verdict:
    if not isinstance(out, DecodeResult):
        return Verdict(ok=False, max_error=math.inf, reason=f"expected a DecodeResult, got {type(out).__name__}")
    draft_tokens, parents, logits = sample.args
    a = sample.attrs
    t = tree(parents)
    B, _, V = logits.shape
    ex = exact(sample)
    tokens, nodes, num = _unpack(out)
    _, ref_nodes, _ = _unpack(ref)
    drafts = draft_tokens.cpu().tolist()
    sampled = a["rule"] == "rejection" or (a["rule"] == "typical" and a["temperature"] > 0)
    worst = 0.0
    for b in range(B):
        path = _path_of(nodes[b], t)
        if isinstance(path, str):
            return Verdict(ok=False, max_error=math.inf, reason=f"row {b}: {path}")
        n = len(path) - 1
        want = [drafts[b][i] for i in path[1:]]
        if num[b] != n or tokens[b][:n] != want or any(v != -1 for v in tokens[b][n + 1:]):
            return Verdict(ok=False, max_error=math.inf, reason=f"row {b}: tokens {tokens[b]} and num_accepted {num[b]} "
                           f"do not follow accepted_nodes {list(path)} (its draft tokens are {want})")
        extra = tokens[b][n]
        if not 0 <= extra < V:
            return Verdict(ok=False, max_error=math.inf, reason=f"row {b}: extra token {extra} is outside [0, {V})")
        if a["rule"] == "rejection":
            reason = _judge_rejection(b, path, extra, sample, ex)
        else:
            ref_path = _path_of(ref_nodes[b], t)
            assert not isinstance(ref_path, str), ref_path
            reason, gap = _judge_tree_path(b, path, ref_path, ex, t)
            worst = max(worst, gap if gap < math.inf else 0.0)
            last = path[-1]
            if reason is None and not sampled and extra != int(ex.argmax[b, last]):
                reason = f"row {b}: extra token {extra}, the argmax at node {last} is {int(ex.argmax[b, last])}"
            if reason is None and sampled and not ex.logp(b, last)[extra] > -math.inf:
                reason = f"row {b}: sampled extra token {extra} has target probability 0 at node {last}"
        if reason is not None:
            return Verdict(ok=False, max_error=math.inf, reason=reason)
    return Verdict(ok=True, max_error=worst)


SPEC = OpSpec(
    name=NAME,
    summary="Speculative-decoding verification of a candidate tree: greedy, Medusa typical acceptance, "
            "or exact rejection sampling over a chain",
    inputs=("draft_tokens", "parents", "target_logits"),
    attrs=(
        Attr(name="draft_probs", default=None, doc="float [B, T, V]: row i is the distribution node i was drawn "
                                                    "from; needed by rule='rejection'"),
        Attr(name="rule", default="greedy", doc="'greedy', 'typical' or 'rejection'"),
        Attr(name="temperature", default=1.0, doc="p = softmax(logits / temperature); 0 means one-hot at the argmax"),
        Attr(name="posterior_threshold", default=0.09, doc="typical: the acceptance threshold's cap"),
        Attr(name="posterior_alpha", default=0.3, doc="typical: the threshold is min(cap, alpha * exp(-entropy))"),
        Attr(name="generator", default=None, doc="torch.Generator for the sampled tokens (kept out of the key)"),
    ),
    verify=_verify,
    key=_key,
    key_sizes=(3, 5),
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
