"""Fused decode_step: one streaming pass over the vocabulary per (batch, node) row, C++ or Triton.

Each row's max, first argmax, ``sum exp(z)`` and ``sum exp(z) z`` (``z = (x - max) / temperature``)
come from a single read of the logits with an online rescale when the max grows (Milakov and
Gimelshein 2018), so the softmax is never materialised; log p(token) and the entropy follow from
those. On the CPU, ``csrc/decode_step.cpp`` does the whole step (OpenMP over rows, then over batch
rows for the tree walk and the sampling); on CUDA, ``triton/decode_step.py`` computes the row
statistics and the torch backend's ``finish`` (B x T elements, plus one row per sampled token) does
the rest.
"""
from __future__ import annotations

import functools

import torch

from core.ops.decode_step import DecodeResult, draw_uniforms, tree, tree_of
from plugins.fused import _build
from registry import Kernel

OP = "decode_step"
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RULE_CODES = {"greedy": 0, "typical": 1, "rejection": 2}


@functools.lru_cache(maxsize=64)
def _tree_tensors(parents: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """parents and lex_rank as CPU tensors for the C++ kernel, and the tree's depth."""
    t = tree_of(parents)
    return torch.tensor(t.parents, dtype=torch.int64), torch.tensor(t.lex_rank, dtype=torch.int64), t.max_depth


def _cpu(draft_tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor, *,
         draft_probs: torch.Tensor | None, rule: str, temperature: float, posterior_threshold: float,
         posterior_alpha: float, generator: torch.Generator | None) -> DecodeResult:
    lib = _build.library(OP)
    par, lex_rank, depth = _tree_tensors(tree(parents).parents)
    B, T, _ = target_logits.shape
    u = draw_uniforms(generator, rule, temperature, B, T, target_logits.device)
    q = draft_probs.float().contiguous() if rule == "rejection" else None
    tokens, num, nodes = lib.decode_step_run(draft_tokens.contiguous(), par, lex_rank, target_logits.contiguous(), q,
                                             RULE_CODES[rule], temperature, posterior_threshold, posterior_alpha,
                                             u.contiguous(), depth)
    return DecodeResult(tokens, num, nodes)


def _cuda(draft_tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor, *,
          draft_probs: torch.Tensor | None, rule: str, temperature: float, posterior_threshold: float,
          posterior_alpha: float, generator: torch.Generator | None) -> DecodeResult:
    from plugins.fused.triton import decode_step as tri
    from plugins.torch_backend.decode_step import finish

    stats = tri.row_stats(target_logits, temperature, entropy=rule == "typical")
    return finish(draft_tokens, parents, target_logits, stats, draft_probs=draft_probs, rule=rule,
                  temperature=temperature, posterior_threshold=posterior_threshold, posterior_alpha=posterior_alpha,
                  generator=generator)


def decode_step(draft_tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor, *,
                draft_probs: torch.Tensor | None, rule: str, temperature: float, posterior_threshold: float,
                posterior_alpha: float, generator: torch.Generator | None) -> DecodeResult:
    """Streaming row statistics (online softmax), then the tree: C++ for CPU tensors, Triton for CUDA."""
    path = _cpu if target_logits.device.type == "cpu" else _cuda
    return path(draft_tokens, parents, target_logits, draft_probs=draft_probs, rule=rule, temperature=temperature,
                posterior_threshold=posterior_threshold, posterior_alpha=posterior_alpha, generator=generator)


def _check(draft_tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor, **attrs: object) -> list[str]:
    reasons = []
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    if target_logits.device.type == "cpu":
        if target_logits.dtype not in CPU_DTYPES:
            reasons.append(f"dtype {name(target_logits.dtype)} on the CPU: its C++ kernel reads "
                           f"{[name(d) for d in CPU_DTYPES]} and computes in float32")
        reason = _build.unavailable_reason(OP)
        if reason:
            reasons.append(reason)
    else:
        if target_logits.dtype not in CUDA_DTYPES:
            reasons.append(f"dtype {name(target_logits.dtype)} on CUDA: its Triton kernel reads "
                           f"{[name(d) for d in CUDA_DTYPES]} and computes in float32")
        reason = _build.triton_reason()
        if reason:
            reasons.append(reason)
    return reasons


KERNELS = [
    Kernel(op=OP, backend="fused", fn=decode_step, devices={"cpu", "cuda"}, dtypes={*CPU_DTYPES, *CUDA_DTYPES},
           priority=30, check=_check,
           description="one pass over the vocabulary per row (online max / sum / entropy, no softmax): C++ with "
                       "OpenMP on the CPU, Triton row statistics on CUDA"),
]
