"""decode_step in torch: per-row statistics by reductions over the vocabulary, then the tree, vectorized.

``row_stats`` gives, for every (batch, node) row, the argmax and max of the raw logits and, at a
temperature above 0, ``log sum exp((x - max) / temperature)`` and the entropy; ``finish`` turns any
kernel's row statistics into the result (the fused Triton path shares it). Everything after the row
statistics touches only B x T elements, plus one row of V per batch row where a token is sampled, and,
above temperature 0, the rows of equally deep paths whose float32 scores lie within ``TOL_REL`` of each
other: those are re-scored in float64 by the reference's rule, so ties break exactly as it breaks them.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import torch

from core.ops.decode_step import TOL_REL, DecodeResult, Tree, draw_uniforms, tree, tree_of
from registry import Kernel

CHUNK_ELEMENTS = 1 << 24  # rows are reduced in chunks of about this many logits, bounding the temporaries


class RowStats(NamedTuple):
    """Per (batch, node) row: argmax (lowest id on ties), max, log of the shifted exp-sum, entropy."""

    argmax: torch.Tensor  # int64 [B, T]
    max: torch.Tensor  # [B, T] of the raw logits
    log_sum: torch.Tensor | None  # [B, T] log sum exp((x - max) / temperature); None at temperature 0
    entropy: torch.Tensor | None  # [B, T] in nats; only for rule="typical" above temperature 0


def row_stats(logits: torch.Tensor, temperature: float, entropy: bool, inner: Sequence[int] | None = None) -> RowStats:
    """Reductions over the vocabulary, in chunks (float32, or float64 for float64 logits).

    The max and argmax come for every row; ``log_sum`` and ``entropy`` only for the nodes in ``inner``
    (every node by default; the others hold NaN): a leaf's distribution decides no node.
    """
    B, T, V = logits.shape
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = logits.reshape(B * T, V)
    amax = torch.empty(B * T, dtype=torch.int64, device=logits.device)
    top = torch.empty(B * T, dtype=work, device=logits.device)
    step = max(1, CHUNK_ELEMENTS // V)
    for start in range(0, B * T, step):
        top[start:start + step], amax[start:start + step] = rows[start:start + step].to(work).max(-1)
    amax, top = amax.reshape(B, T), top.reshape(B, T)
    if temperature == 0:
        return RowStats(amax, top, None, None)
    nodes = torch.arange(T, device=logits.device) if inner is None else torch.tensor(list(inner), device=logits.device,
                                                                                        dtype=torch.int64)
    log_sum = torch.full((B, T), float("nan"), dtype=work, device=logits.device)
    ent = torch.full((B, T), float("nan"), dtype=work, device=logits.device) if entropy else None
    step = max(1, CHUNK_ELEMENTS // max(1, len(nodes) * V))
    for start in range(0, B if len(nodes) else 0, step):
        x = logits[start:start + step, nodes].to(work)
        z = (x - top[start:start + step, nodes, None]).div_(temperature).clamp_(min=-1e4)  # -inf: e = 0, e * z = 0
        e = z.exp()
        s = e.sum(-1)
        log_sum[start:start + step, nodes] = s.log()
        if ent is not None:
            ent[start:start + step, nodes] = s.log() - e.mul_(z).sum(-1) / s
    return RowStats(amax, top, log_sum, ent)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative weight exceeds u * total, never one of weight 0."""
    cdf = weights.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    V = weights.shape[-1]
    last_positive = V - 1 - (weights > 0).flip(-1).to(torch.int8).argmax(-1)
    ok = idx < V
    ok &= weights.gather(1, idx.clamp(max=V - 1)[:, None])[:, 0] > 0
    return torch.where(ok, idx, last_positive)


def _row_probs(logits: torch.Tensor, stats: RowStats, node: torch.Tensor, temperature: float) -> torch.Tensor:
    """Float64 p at node[b] of each batch row: [B, V] (the row's own softmax: a leaf has no log_sum)."""
    b = torch.arange(logits.shape[0], device=logits.device)
    x = logits[b, node].double()
    if temperature == 0:
        return torch.zeros_like(x).scatter_(1, stats.argmax[b, node][:, None], 1.0)
    return torch.softmax((x - stats.max[b, node].double()[:, None]) / temperature, -1)


def _token_log_probs(logits: torch.Tensor, draft_tokens: torch.Tensor, parents: torch.Tensor, stats: RowStats,
                     temperature: float) -> torch.Tensor:
    """Float64 [B, T]: log p(parent)[token] of every node (0 at the root; -inf for a non-argmax at temperature 0)."""
    B, T, _ = logits.shape
    b = torch.arange(B, device=logits.device)[:, None]
    par = parents.clamp(min=0)[None, :]
    out = torch.zeros(B, T, dtype=torch.float64, device=logits.device)
    if T == 1:
        return out
    tok = draft_tokens[:, 1:]
    if temperature == 0:
        hit = tok == stats.argmax[b, par[:, 1:]]
        out[:, 1:] = torch.where(hit, 0.0, float("-inf"))
        return out
    x = logits[b, par[:, 1:], tok].double()
    out[:, 1:] = (x - stats.max[b, par[:, 1:]].double()) / temperature - stats.log_sum[b, par[:, 1:]].double()
    return out


def _exact_log_sum(row: torch.Tensor, top: float, temperature: float) -> float:
    """log sum exp((x - max) / temperature) of one row in float64, by the reference's rule.

    The terms are sorted before they are summed, so the result depends only on the row's values, not
    their order: rows that are permutations of each other give the same sum, as the reference's exactly
    rounded sum does, and their paths tie exactly.
    """
    z = (row.double() - top) / temperature
    return float(z.sort().values.exp().sum().log())


def _exact_scores(logits: torch.Tensor, draft_tokens: torch.Tensor, stats: RowStats, t: Tree, temperature: float,
                  b: int, nodes: list[int]) -> list[float]:
    """The float64 path scores of ``nodes`` in batch row b, summed from the root down like the reference's."""
    rows = sorted({t.parents[i] for n in nodes for i in t.paths[n][1:]})
    top = dict(zip(rows, stats.max[b, rows].double().tolist()))
    log_sum = {r: _exact_log_sum(logits[b, r], top[r], temperature) for r in rows}
    tokens = draft_tokens[b].tolist()
    scores = []
    for n in nodes:
        score = 0.0
        for i in t.paths[n][1:]:
            p = t.parents[i]
            score += (float(logits[b, p, tokens[i]]) - top[p]) / temperature - log_sum[p]
        scores.append(score)
    return scores


def _tree_path(passes: torch.Tensor, logp: torch.Tensor, t: Tree,
               rescore: Callable[[int, list[int]], list[float]] | None = None) -> torch.Tensor:
    """The accepted node of each batch row: deepest alive, then highest score, then lowest path.

    ``logp`` comes from float32 row statistics, good to about 1e-6: where equally deep paths score
    within ``TOL_REL`` of the best, ``rescore(b, nodes)`` gives their float64 scores and decides.
    """
    B, T = passes.shape
    device = passes.device
    alive = torch.zeros(B, T, dtype=torch.bool, device=device)
    alive[:, 0] = True
    score = torch.zeros(B, T, dtype=torch.float64, device=device)
    for level in t.levels:  # root to leaves, so a score sums in the reference's order
        nodes = torch.tensor(level, device=device)
        up = torch.tensor([t.parents[i] for i in level], device=device)
        alive[:, nodes] = alive[:, up] & passes[:, nodes]
        score[:, nodes] = score[:, up] + logp[:, nodes]
    depth = torch.tensor(t.depth, device=device)
    best = torch.where(alive, depth, -1).amax(1, keepdim=True)
    candidate = alive & (depth == best)
    s = torch.where(candidate, score, float("-inf"))
    top = s.amax(1, keepdim=True)
    near = candidate & (s >= top - TOL_REL * (1 + top.abs()))
    candidate &= s == top
    rank = torch.where(candidate, torch.tensor(t.lex_rank, device=device), T)
    last = rank.argmin(1)
    if rescore is not None:
        for b in torch.nonzero(near.sum(1) > 1)[:, 0].tolist():
            nodes = torch.nonzero(near[b])[:, 0].tolist()
            scores = rescore(b, nodes)
            last[b] = max(zip(scores, nodes), key=lambda sn: (sn[0], -t.lex_rank[sn[1]]))[1]
    return last


@functools.lru_cache(maxsize=64)
def _path_table(parents: tuple[int, ...]) -> torch.Tensor:
    """int64 [T, D + 1]: row i is node i's path from the root, padded with -1."""
    t = tree_of(parents)
    table = torch.full((len(t.parents), t.max_depth + 1), -1, dtype=torch.int64)
    for i, path in enumerate(t.paths):
        table[i, :len(path)] = torch.tensor(path)
    return table


def _result(draft_tokens: torch.Tensor, t: Tree, last: torch.Tensor, extra: torch.Tensor) -> DecodeResult:
    device = draft_tokens.device
    nodes = _path_table(t.parents).to(device)[last]
    num = torch.tensor(t.depth, device=device)[last]
    tokens = torch.where(nodes >= 0, draft_tokens.gather(1, nodes.clamp(min=0)), -1)
    tokens = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], 1)
    tokens.scatter_(1, num[:, None], extra[:, None])
    return DecodeResult(tokens, num, nodes)


def finish(draft_tokens: torch.Tensor, parents: torch.Tensor, logits: torch.Tensor, stats: RowStats, *,
           draft_probs: torch.Tensor | None, rule: str, temperature: float, posterior_threshold: float,
           posterior_alpha: float, generator: torch.Generator | None) -> DecodeResult:
    """The decision from per-row statistics: which nodes pass, the accepted path and the extra token."""
    t = tree(parents)
    B, T, _ = logits.shape
    device = logits.device
    u = draw_uniforms(generator, rule, temperature, B, T, device)
    parents = parents.to(device)
    if rule == "rejection":
        return _rejection(draft_tokens, logits, stats, draft_probs, temperature, u, t)
    logp = _token_log_probs(logits, draft_tokens, parents, stats, temperature)
    par = parents.clamp(min=0)
    if rule == "greedy" or temperature == 0:
        passes = draft_tokens == stats.argmax[:, par]
    else:
        cutoff = (posterior_alpha * torch.exp(-stats.entropy.double())).clamp(max=posterior_threshold)[:, par]
        passes = logp.exp() > cutoff
    rescore = None
    if temperature > 0:  # at temperature 0 every passing token has log-probability 0 exactly
        rescore = functools.partial(_exact_scores, logits, draft_tokens, stats, t, temperature)
    last = _tree_path(passes, logp, t, rescore)
    if rule == "typical" and temperature > 0:
        extra = _inverse_cdf(_row_probs(logits, stats, last, temperature), u[:, 0])
    else:
        extra = stats.argmax[torch.arange(B, device=device), last]
    return _result(draft_tokens, t, last, extra)


def _rejection(draft_tokens: torch.Tensor, logits: torch.Tensor, stats: RowStats, q: torch.Tensor, temperature: float,
               u: torch.Tensor, t: Tree) -> DecodeResult:
    """Speculative sampling over a chain of k = T - 1 drafts (Leviathan et al. 2023, Algorithm 1)."""
    B, T, V = logits.shape
    k = T - 1
    b = torch.arange(B, device=logits.device)
    p_tok = _token_log_probs(logits, draft_tokens, torch.arange(-1, k, device=logits.device), stats, temperature)[:, 1:].exp()
    q_tok = q[:, 1:].gather(2, draft_tokens[:, 1:, None])[..., 0].double()  # column 0 is not a token
    accept = (q_tok > 0) & (u[:, :k] * q_tok < p_tok)
    n = accept.to(torch.int64).cumprod(1).sum(1) if k else torch.zeros(B, dtype=torch.int64, device=logits.device)
    p = _row_probs(logits, stats, n, temperature)
    q_next = q[b, (n + 1).clamp(max=k)].double()
    residual = torch.where((n < k)[:, None], (p - q_next).clamp(min=0), p)
    weights = torch.where((residual.sum(-1) > 0)[:, None], residual, p)
    extra = _inverse_cdf(weights, u[:, k])
    return _result(draft_tokens, t, n, extra)


def decode_step(draft_tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor, *,
                draft_probs: torch.Tensor | None, rule: str, temperature: float, posterior_threshold: float,
                posterior_alpha: float, generator: torch.Generator | None) -> DecodeResult:
    """Row statistics by torch reductions (max for every row; exp and sums for rows with children), then
    ``finish``; CPU and CUDA."""
    inner = [i for i, has in enumerate(tree(parents).has_children) if has]
    stats = row_stats(target_logits, temperature, entropy=rule == "typical", inner=inner)
    return finish(draft_tokens, parents, target_logits, stats, draft_probs=draft_probs, rule=rule,
                  temperature=temperature, posterior_threshold=posterior_threshold, posterior_alpha=posterior_alpha,
                  generator=generator)


KERNELS = [
    Kernel(op="decode_step", backend="torch", fn=decode_step, devices={"cpu", "cuda"},
           dtypes={torch.float16, torch.bfloat16, torch.float32, torch.float64}, priority=10,
           description="per-row max / exp / sum reductions in chunks of rows, then the tree vectorized over the batch"),
]
