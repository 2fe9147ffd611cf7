"""decode_step's sampled tokens, statistically: rejection sampling leaves the target's distribution,
accepts at rate sum(min(p, q)) and emits (1 - a^(k+1)) / (1 - a) tokens per step; typical's extra token
follows p. Every batch row is one independent draw, so one call gives N = 100,000 draws.

Thresholds: a chi-square p-value below 1e-6, or a mean more than 5 standard errors from its
expectation, fails (a correct kernel fails about once in a million runs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from core.ops.decode_step import SPEC
from plugins.fused.decode_step import decode_step as fused_kernel
from plugins.reference.decode_step import decode_step as reference
from plugins.torch_backend.decode_step import decode_step as torch_kernel

N = 100_000
V = 10
K = 3
P_MIN = 1e-6
SIGMAS = 5.0
KERNELS = {"reference": reference, "torch": torch_kernel, "fused": fused_kernel}


def _chi_square(tokens: torch.Tensor, p: np.ndarray) -> float:
    """The p-value of the emitted tokens' counts against the distribution p (no token where p is 0)."""
    counts = np.bincount(tokens.numpy(), minlength=len(p))
    assert counts.sum() == len(tokens) and len(counts) == len(p), "a token outside [0, V)"
    assert counts[p == 0].sum() == 0, "a token of probability 0"
    live = p > 0
    if live.sum() == 1:  # one possible token: the assertion above already checked every draw
        return 1.0
    return float(stats.chisquare(counts[live], p[live] / p[live].sum() * counts.sum()).pvalue)


def _rejection_inputs(gen: torch.Generator, temperature: float):
    """Every node has the same target logits and the same draft distribution, so each draft is accepted
    independently with probability a = sum(min(p, q)); drafts are drawn from q."""
    target = torch.randn(V, generator=gen, dtype=torch.float64) * 1.5
    q = torch.softmax(torch.randn(V, generator=gen, dtype=torch.float64) * 1.5, 0)
    p = torch.softmax(target / temperature, 0)
    drafts = torch.multinomial(q, N * K, replacement=True, generator=gen).reshape(N, K)
    draft_tokens = torch.cat([torch.zeros(N, 1, dtype=torch.int64), drafts], 1)
    logits = target.float().expand(N, K + 1, V).contiguous()
    draft_probs = q.float().expand(N, K + 1, V).contiguous()
    attrs = {"draft_probs": draft_probs, "rule": "rejection", "temperature": temperature,
             "generator": torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))}
    args, attrs = SPEC.prepare((draft_tokens, torch.arange(-1, K), logits), attrs)
    # the kernels compute p from float32 logits: the expectation uses the same logits
    p = torch.softmax(target.float().double() / temperature, 0).numpy()
    return args, attrs, p, q.float().double().numpy()


CASES = [("reference", 1.0), ("torch", 1.0), ("torch", 0.6), ("fused", 1.0), ("fused", 0.6)]


@pytest.mark.parametrize("kernel, temperature", CASES)
def test_rejection_sampling_keeps_the_target_distribution(kernel, temperature, gen):
    args, attrs, p, q = _rejection_inputs(gen, temperature)
    out = KERNELS[kernel](*args, **attrs)
    tokens, num = out.tokens, out.num_accepted
    assert bool(((tokens >= -1) & (tokens < V)).all())
    # The first emitted token follows p: accepted drafts and residual samples together.
    assert _chi_square(tokens[:, 0], p) > P_MIN
    # Given the first draft was accepted, the second emitted token follows p (node 1's distribution) too.
    assert _chi_square(tokens[num >= 1, 1], p) > P_MIN
    # The residual alone follows normalize(max(p - q, 0)).
    residual = np.maximum(p - q, 0)
    assert _chi_square(tokens[num == 0, 0], residual / residual.sum()) > P_MIN
    # Acceptance rate of one draft: a = sum(min(p, q)).
    a = float(np.minimum(p, q).sum())
    rate = float((num >= 1).double().mean())
    assert abs(rate - a) < SIGMAS * np.sqrt(a * (1 - a) / N), (rate, a)
    # Tokens per step for a chain of K drafts accepted independently: (1 - a^(K+1)) / (1 - a).
    per_step = (num + 1).double()
    expected = (1 - a ** (K + 1)) / (1 - a)
    assert abs(float(per_step.mean()) - expected) < SIGMAS * float(per_step.std()) / np.sqrt(N), (per_step.mean(), expected)


@pytest.mark.parametrize("kernel", KERNELS)
def test_typical_extra_token_follows_p(kernel, gen):
    """A root-only tree: the extra token of every row is a sample from p = softmax(logits / 0.8)."""
    target = torch.randn(V, generator=gen) * 2
    logits = target.expand(N, 1, V).contiguous()
    attrs = {"rule": "typical", "temperature": 0.8, "generator": torch.Generator().manual_seed(1)}
    args, attrs = SPEC.prepare((torch.zeros(N, 1, dtype=torch.int64), torch.tensor([-1]), logits), attrs)
    out = KERNELS[kernel](*args, **attrs)
    p = torch.softmax(target.double() / 0.8, 0).numpy()
    assert _chi_square(out.tokens[:, 0], p) > P_MIN


@pytest.mark.parametrize("kernel", ["torch", "fused"])
def test_sampling_never_emits_a_token_of_probability_zero(kernel, gen):
    """Masked (-inf) logits and zeros in q: no emitted token may have p = 0 (or lie outside the residual)."""
    n = 20_000
    target = torch.randn(V, generator=gen) * 2
    target[::3] = float("-inf")
    q = torch.softmax(torch.randn(V, generator=gen), 0)
    q[1::3] = 0
    q = q / q.sum()
    drafts = torch.multinomial(q, n * K, replacement=True, generator=gen).reshape(n, K)
    attrs = {"draft_probs": q.expand(n, K + 1, V).contiguous(), "rule": "rejection", "temperature": 1.0,
             "generator": torch.Generator().manual_seed(2)}
    args, attrs = SPEC.prepare((torch.cat([torch.zeros(n, 1, dtype=torch.int64), drafts], 1), torch.arange(-1, K),
                                target.expand(n, K + 1, V).contiguous()), attrs)
    out = KERNELS[kernel](*args, **attrs)
    emitted = out.tokens[out.tokens >= 0]
    assert not bool((emitted % 3 == 0).any())
