"""Reference decode_step: plain Python loops over the batch and the tree, float64 numpy per row."""
from __future__ import annotations

import math

import numpy as np
import torch

from core.ops.decode_step import DecodeResult, Tree, draw_uniforms, tree
from registry import Kernel


def _log_probs(x: np.ndarray, temperature: float, exact_sum: bool = False) -> np.ndarray:
    """log softmax(x / temperature); at temperature 0, 0 at the (first) argmax and -inf elsewhere.

    ``exact_sum``: the exp-sum by ``math.fsum`` (exactly rounded), for the log-probabilities that order
    paths: it does not depend on the order of the row's entries, so rows that are permutations of each
    other tie exactly.
    """
    if temperature == 0:
        out = np.full(x.shape, -np.inf)
        out[np.argmax(x)] = 0.0
        return out
    z = (x - x.max()) / temperature
    e = np.exp(z)
    return z - np.log(math.fsum(e.tolist()) if exact_sum else e.sum())


def _entropy(logp: np.ndarray) -> float:
    p = np.exp(logp)
    return float(-(p * np.where(p > 0, logp, 0.0)).sum())


def _sample(weights: np.ndarray, u: float, x: np.ndarray) -> int:
    """Inverse CDF: the first index whose cumulative weight exceeds u * total (never a zero weight).

    Weights with no positive mass (only from NaN or +inf logits ``x``, which break the precondition)
    give the argmax of ``x``, so the token is still in range.
    """
    weights = np.where(weights > 0, weights, 0.0)  # NaN: 0
    cdf = np.cumsum(weights)
    if not 0 < cdf[-1] < math.inf:
        return int(np.argmax(x))
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    if i >= len(weights) or weights[i] <= 0:
        i = int(np.flatnonzero(weights > 0)[-1])
    return i


def _verify_tree(x: np.ndarray, drafts: list[int], t: Tree, rule: str, temperature: float, threshold: float,
                 alpha: float) -> tuple[int, ...]:
    """The accepted path of one batch row under ``greedy`` or ``typical``."""
    logp = {}
    alive = {0: 0.0}  # node -> sum of log-probabilities from the root
    for i in range(1, len(t.parents)):
        parent = t.parents[i]
        if parent not in alive:
            continue
        if parent not in logp:
            logp[parent] = _log_probs(x[parent], temperature, exact_sum=True)
        token = drafts[i]
        if rule == "greedy" or temperature == 0:
            passes = token == int(np.argmax(x[parent]))
        else:
            cutoff = min(threshold, alpha * math.exp(-_entropy(logp[parent])))
            passes = math.exp(logp[parent][token]) > cutoff
        if passes:
            alive[i] = alive[parent] + float(logp[parent][token])
    return max((t.paths[i] for i in alive), key=lambda path: (len(path), alive[path[-1]], [-n for n in path]))


def _verify_chain(x: np.ndarray, q: np.ndarray, drafts: list[int], u: np.ndarray, temperature: float) -> tuple[int, int]:
    """Speculative sampling over a chain: (accepted drafts n, extra token)."""
    k = len(drafts) - 1
    for j in range(1, k + 1):
        p = np.exp(_log_probs(x[j - 1], temperature))
        token = drafts[j]
        if not (q[j, token] > 0 and u[j - 1] < min(1.0, p[token] / q[j, token])):
            residual = np.maximum(p - q[j], 0.0)
            return j - 1, _sample(residual if residual.sum() > 0 else p, u[k], x[j - 1])
    return k, _sample(np.exp(_log_probs(x[k], temperature)), u[k], x[k])


def decode_step(draft_tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor, *,
                draft_probs: torch.Tensor | None, rule: str, temperature: float, posterior_threshold: float,
                posterior_alpha: float, generator: torch.Generator | None) -> DecodeResult:
    """Each batch row on its own: the passing nodes in index order, then the best path, then the extra token."""
    t = tree(parents)
    B, T, _ = target_logits.shape
    device = target_logits.device
    uniforms = draw_uniforms(generator, rule, temperature, B, T, device).cpu().numpy()
    X = target_logits.detach().cpu().double().numpy()
    Q = draft_probs.detach().cpu().double().numpy() if rule == "rejection" else None
    drafts = draft_tokens.cpu().tolist()
    width = t.max_depth + 1
    tokens = np.full((B, width), -1, dtype=np.int64)
    nodes = np.full((B, width), -1, dtype=np.int64)
    for b in range(B):
        if rule == "rejection":
            n, extra = _verify_chain(X[b], Q[b], drafts[b], uniforms[b], temperature)
            path = tuple(range(n + 1))
        else:
            path = _verify_tree(X[b], drafts[b], t, rule, temperature, posterior_threshold, posterior_alpha)
            last = path[-1]
            if rule == "typical" and temperature > 0:
                extra = _sample(np.exp(_log_probs(X[b, last], temperature)), uniforms[b, 0], X[b, last])
            else:
                extra = int(np.argmax(X[b, last]))
        accepted = [drafts[b][i] for i in path[1:]]
        tokens[b, :len(path)] = accepted + [extra]
        nodes[b, :len(path)] = path
    num = (nodes >= 0).sum(1) - 1
    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return DecodeResult(as_tensor(tokens), as_tensor(num.astype(np.int64)), as_tensor(nodes))


KERNELS = [
    Kernel(op="decode_step", backend="reference", fn=decode_step, devices={"cpu", "cuda"}, priority=-100,
           description="float64 numpy, one batch row and one tree node at a time: the executable definition"),
]
