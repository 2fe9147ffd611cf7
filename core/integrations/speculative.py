"""Speculative decoding for transformers causal LMs: a draft model proposes, the target scores every
proposal in one forward pass, ``dispatcher.decode_step`` verifies.

``generate(target, draft, input_ids, max_new_tokens=..., rule=...)`` runs one sequence (batch 1):

- a chain (default): the draft proposes ``num_draft`` tokens one after another (its argmax for
  ``greedy`` and ``typical``, a sample from ``softmax(logits / temperature)`` for ``rejection``, whose
  distributions go to ``decode_step`` as ``draft_probs``); the target reads the last committed token
  and the drafts in one forward over its KV cache, and its logits at those ``k + 1`` positions are
  ``decode_step``'s ``target_logits``;
- a candidate tree (``parents=``, Medusa-style, ``greedy`` or ``typical``): node i's r-th child is the
  draft's r-th likeliest token after the path to i, drafted level by level; the target scores the whole
  tree in one forward with a 4-D attention mask (the committed prefix, then ``tree_attention_mask``)
  and position ids ``prefix + depth``.

After each step both KV caches are rolled back to the accepted prefix: sliced for a chain, the accepted
path's entries gathered into place for a tree. The caches are plain ``DynamicCache`` layers (whole
history kept), so rollback never loses states a sliding-window layer would have dropped; a model's
sliding window is applied by its own mask for chains and by ours for trees.

What the rules guarantee: ``greedy`` emits exactly the target's own greedy tokens (up to float rounding
between a one-token and a many-token forward); ``rejection`` samples exactly the target's distribution
at ``temperature``, whatever the draft (Leviathan et al. 2023); ``typical`` is Medusa's relaxed rule.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from core.errors import InvalidInput
from core.ops.decode_step import RULES, tree_attention_mask, tree_of

NAME = "speculative.generate"


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeculativeOutput:
    """What one speculative ``generate`` call produced."""

    sequences: torch.Tensor  # int64 [1, prompt + new tokens]
    accepted: tuple[int, ...]  # draft tokens accepted at each verification step
    steps: int  # target forward passes that verified drafts (one per step)

    @property
    def tokens_per_step(self) -> float:
        """Committed tokens per target forward (accepted drafts plus the one the target adds)."""
        return (sum(self.accepted) + self.steps) / self.steps if self.steps else 0.0


# -- caches ----------------------------------------------------------------------------------------

def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()  # no config: full layers everywhere (a sliding layer could not be rolled back)


def _cache_len(cache: Any) -> int:
    return int(cache.get_seq_length())


def _keep(cache: Any, prefix: int, extra: torch.Tensor | None = None) -> None:
    """Keep the first ``prefix`` positions of every layer, followed by the positions ``extra``."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        if extra is None:
            layer.keys, layer.values = layer.keys[..., :prefix, :], layer.values[..., :prefix, :]
        else:
            idx = torch.cat([torch.arange(prefix), extra]).to(layer.keys.device)
            layer.keys, layer.values = layer.keys.index_select(-2, idx), layer.values.index_select(-2, idx)


# -- model calls -----------------------------------------------------------------------------------

def _mask_for(model: Any, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4-D mask [1, 1, Lq, Lk] in the form the model's attention takes: bool for sdpa-style
    implementations, additive float for eager."""
    allowed = allowed[None, None]
    if getattr(model.config, "_attn_implementation", None) == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


@functools.lru_cache(maxsize=64)
def _cache_kwarg(cls: type) -> str:
    """The name a model's forward takes its cache under: ``cache`` in newer transformers 5 releases,
    ``past_key_values`` (deprecated there) before."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _forward(model: Any, ids: torch.Tensor, cache: Any, *, positions: torch.Tensor | None = None,
             allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [L, V] (float32) of ``ids`` [L] appended to ``cache``."""
    device = model.device
    kwargs: dict[str, Any] = {}
    if positions is not None:
        kwargs["position_ids"] = positions[None].to(device)
    if allowed is not None:
        kwargs["attention_mask"] = _mask_for(model, allowed, model.dtype).to(device)
    kwargs[_cache_kwarg(type(model))] = cache
    out = model(input_ids=ids[None].to(device), use_cache=True, **kwargs)
    return out.logits[0].float()


def _window(model: Any) -> int | None:
    window = getattr(model.config, "sliding_window", None)
    return int(window) if window else None


def _allowed(prefix: int, key_pos: torch.Tensor, q_pos: torch.Tensor, tree_part: torch.Tensor,
             window: int | None) -> torch.Tensor:
    """Bool [Lq, prefix + Lt]: every committed position, then the tree columns ``tree_part`` allows;
    with a sliding window, only keys within it (transformers' rule: ``k > q - window``)."""
    allowed = torch.cat([torch.ones(len(q_pos), prefix, dtype=torch.bool), tree_part], 1)
    if window is not None:
        keys = torch.cat([torch.arange(prefix), key_pos])
        allowed &= keys[None, :] > q_pos[:, None] - window
    return allowed


# -- proposals -------------------------------------------------------------------------------------

def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    return torch.softmax(logits.double() / temperature, -1).float()


def _propose_chain(draft: Any, cache: Any, seq: torch.Tensor, k: int, rule: str, temperature: float,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k draft tokens after ``seq`` and, for rejection, the distributions they were drawn from [k, V]."""
    logits = _forward(draft, seq[_cache_len(cache):], cache)[-1]
    tokens, dists = [], []
    for i in range(k):
        if rule == "rejection":
            q = _probs(logits, temperature)
            token = torch.multinomial(q.double().cpu(), 1, generator=generator)[0]
            dists.append(q)
        else:
            token = logits.argmax(-1).cpu()
        tokens.append(token)
        if i < k - 1:
            logits = _forward(draft, token[None], cache)[-1]
    return torch.stack(tokens), (torch.stack(dists) if dists else None)


def _propose_tree(draft: Any, cache: Any, seq: torch.Tensor, parents: tuple[int, ...]) -> torch.Tensor:
    """Node tokens [T] (node 0 the last committed token): node i's r-th child is the draft's r-th
    likeliest token after the path to i. Drafted one level per forward; the draft's cache is left
    holding ``seq`` only."""
    t = tree_of(parents)
    n = len(seq)
    root_logits = _forward(draft, seq[_cache_len(cache):], cache)[-1]
    tokens = torch.zeros(len(parents), dtype=torch.int64)
    tokens[0] = seq[-1]
    rank = [0] * len(parents)
    seen: dict[int, int] = {}
    for i, p in enumerate(parents[1:], 1):
        rank[i] = seen.get(p, 0)
        seen[p] = rank[i] + 1
    logits_at = {0: root_logits}
    ancestors = tree_attention_mask(torch.tensor(parents))
    fed: list[int] = []  # tree nodes in the draft's cache, in cache order after the committed n
    window = _window(draft)
    for level, nodes in enumerate(t.levels, 1):
        for i in nodes:
            top = logits_at[parents[i]].topk(rank[i] + 1).indices
            tokens[i] = top[rank[i]].cpu()
        if level == t.max_depth:
            break
        cols = torch.tensor(fed + list(nodes), dtype=torch.int64)
        tree_part = ancestors[list(nodes)][:, cols] if len(cols) else torch.zeros(len(nodes), 0, dtype=torch.bool)
        key_pos = torch.tensor([n - 1 + t.depth[j] for j in cols.tolist()], dtype=torch.int64)
        q_pos = torch.full((len(nodes),), n - 1 + level, dtype=torch.int64)
        out = _forward(draft, tokens[list(nodes)], cache, positions=q_pos,
                       allowed=_allowed(n, key_pos, q_pos, tree_part, window))
        for row, i in enumerate(nodes):
            logits_at[i] = out[row]
        fed += list(nodes)
    _keep(cache, n)
    return tokens


# -- the loop --------------------------------------------------------------------------------------

def _check(target: Any, draft: Any, input_ids: Any, max_new_tokens: Any, num_draft: Any, rule: Any,
           parents: Sequence[int] | None) -> torch.Tensor:
    for arg, model in (("target", target), ("draft", draft)):
        if not callable(model) or not hasattr(model, "config"):
            raise InvalidInput(f"{NAME}: argument {arg!r}: expected a transformers causal LM, got {type(model).__name__}")
    if getattr(target.config, "vocab_size", None) != getattr(draft.config, "vocab_size", None):
        raise InvalidInput(f"{NAME}: argument 'draft': expected the target's vocabulary size "
                           f"{target.config.vocab_size}, got {draft.config.vocab_size}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64 or input_ids.dim() not in (1, 2) \
            or input_ids.shape[-1] == 0 or (input_ids.dim() == 2 and input_ids.shape[0] != 1):
        got = f"shape {tuple(input_ids.shape)}, dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) \
            else type(input_ids).__name__
        raise InvalidInput(f"{NAME}: argument 'input_ids': expected an int64 tensor [1, L] or [L] with L >= 1 "
                           f"(one sequence; batches are not supported), got {got}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidInput(f"{NAME}: argument 'max_new_tokens': expected an int >= 1, got {max_new_tokens!r}")
    if rule not in RULES:
        raise InvalidInput(f"{NAME}: argument 'rule': expected one of {list(RULES)}, got {rule!r}")
    if parents is None and (isinstance(num_draft, bool) or not isinstance(num_draft, int) or num_draft < 1):
        raise InvalidInput(f"{NAME}: argument 'num_draft': expected an int >= 1, got {num_draft!r}")
    if parents is not None and rule == "rejection":
        raise InvalidInput(f"{NAME}: argument 'parents': expected None (a chain) for rule='rejection', got a tree: "
                           f"speculative sampling keeps the target's distribution for a single draft sequence only; "
                           f"verify a tree with rule='typical' or rule='greedy'")
    return input_ids.reshape(-1).cpu()


def _eos_ids(target: Any, eos_token_id: Any) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])}


@torch.no_grad()
def generate(target: Any, draft: Any, input_ids: torch.Tensor, *, max_new_tokens: int, num_draft: int = 4,
             rule: str = "greedy", temperature: float = 1.0, parents: Sequence[int] | None = None,
             generator: torch.Generator | None = None, eos_token_id: int | Sequence[int] | None = None,
             posterior_threshold: float = 0.09, posterior_alpha: float = 0.3) -> SpeculativeOutput:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (one sequence) with ``target``,
    drafted by ``draft``; stops after an end-of-sequence token (the target's generation config's by default).

    ``rule`` is decode_step's (``greedy``, ``typical``, ``rejection``); ``temperature`` applies to both
    models' distributions; ``parents`` (a candidate tree, e.g. ``decode_step.medusa_tree(16)``) replaces
    the chain of ``num_draft`` tokens; ``generator`` drives every sample (draft tokens and decode_step's).
    """
    from core import dispatcher

    seq = _check(target, draft, input_ids, max_new_tokens, num_draft, rule, parents)
    parents_t = torch.as_tensor(list(parents) if parents is not None else range(-1, num_draft))
    tree_mask = tree_attention_mask(parents_t)  # InvalidInput for anything but a valid tree of int64 indices
    tree = tuple(parents_t.tolist())
    is_chain = parents is None
    stop = _eos_ids(target, eos_token_id)
    t_cache, d_cache = _new_cache(), _new_cache()
    prompt = len(seq)
    accepted: list[int] = []
    device = target.device
    while len(seq) - prompt < max_new_tokens:
        n = len(seq)
        if is_chain:
            drafts, dists = _propose_chain(draft, d_cache, seq, num_draft, rule, temperature, generator)
            tokens = torch.cat([seq[-1:], drafts])
            logits = _forward(target, torch.cat([seq[_cache_len(t_cache):], drafts]), t_cache)[-len(tokens):]
        else:
            tokens = _propose_tree(draft, d_cache, seq, tree)
            dists = None
            if _cache_len(t_cache) < n - 1:
                _forward(target, seq[_cache_len(t_cache):n - 1], t_cache)
            depth = torch.tensor(tree_of(tree).depth, dtype=torch.int64)
            q_pos = n - 1 + depth
            logits = _forward(target, tokens, t_cache, positions=q_pos,
                              allowed=_allowed(n - 1, q_pos, q_pos, tree_mask, _window(target)))
        draft_probs = None
        if dists is not None:
            uniform = torch.full((1, dists.shape[-1]), 1.0 / dists.shape[-1])
            draft_probs = torch.cat([uniform, dists.cpu()])[None].to(device)
        result = dispatcher.decode_step(tokens[None].to(device), parents_t.to(device), logits[None],
                                        draft_probs=draft_probs, rule=rule, temperature=temperature,
                                        posterior_threshold=posterior_threshold, posterior_alpha=posterior_alpha,
                                        generator=generator)
        num = int(result.num_accepted[0])
        new = result.tokens[0, :num + 1].cpu()
        accepted.append(num)
        if is_chain:
            _keep(t_cache, n + num)
        else:
            path = result.accepted_nodes[0, :num + 1].cpu()
            _keep(t_cache, n - 1, (n - 1) + path)
        _keep(d_cache, min(_cache_len(d_cache), n + num))
        seq = torch.cat([seq, new])
        hit = [i for i, tok in enumerate(new.tolist()) if tok in stop]
        if hit:
            seq = seq[: n + hit[0] + 1]
            break
    seq = seq[: prompt + max_new_tokens]
    return SpeculativeOutput(sequences=seq[None].to(input_ids.device), accepted=tuple(accepted), steps=len(accepted))
