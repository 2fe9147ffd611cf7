"""Speculative decoding with real (tiny, random-weight) transformers models: greedy equals the target's
own greedy generate for chains and Medusa-style trees, whatever the draft; rejection sampling leaves
the target's distribution (chi-square over many seeded runs, as the op's own sampling tests do).

Drafts: an unrelated random model (accepts almost nothing), the target itself (accepts everything), and
the target cut to its first layer (sharing its embedding and head: accepts some, so partial acceptance
and the cache rollback are exercised). Thresholds as in test_decode_step_sampling: p < 1e-6 fails.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

transformers = pytest.importorskip("transformers")

from core.errors import InvalidInput  # noqa: E402
from core.integrations import speculative  # noqa: E402
from core.integrations import transformers as sy_transformers  # noqa: E402
from core.ops.decode_step import medusa_tree  # noqa: E402

P_MIN = 1e-6
V = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models are dominated by per-op overhead; two threads on two shared cores only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    yield
    torch.set_num_threads(threads)


def _model(config_cls, layers: int, seed: int, impl: str = "sdpa", vocab: int = V, **kw):
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=None,
                     **kw)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def _first_layer_of(target):
    """The target cut to its first decoder layer: same embedding, head and first layer."""
    draft = copy.deepcopy(target)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    return draft


@pytest.fixture(scope="module", params=["llama-sdpa", "mistral-window-switchyard"])
def pair(request):
    sy_transformers.register()
    if request.param == "llama-sdpa":
        target = _model(transformers.LlamaConfig, 3, 1)
    else:  # a window of 3 matters for every prompt and tree here
        target = _model(transformers.MistralConfig, 3, 2, impl="switchyard", sliding_window=3)
    return target


@pytest.mark.parametrize("draft_kind", ["random", "self", "first-layer"])
@pytest.mark.parametrize("shape", ["chain-4", "tree-12"])
def test_greedy_equals_the_targets_greedy_generate(pair, draft_kind, shape, gen):
    target = pair
    draft = {"random": lambda: _model(type(target.config), 1, 7), "self": lambda: target,
             "first-layer": lambda: _first_layer_of(target)}[draft_kind]()
    ids = torch.randint(0, V, (1, 5), generator=gen)
    want = target.generate(ids, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids))
    parents = medusa_tree(12, 3) if shape == "tree-12" else None
    out = speculative.generate(target, draft, ids, max_new_tokens=16, num_draft=4, rule="greedy", parents=parents)
    assert torch.equal(out.sequences, want), (out.sequences, want, out.accepted)
    depth = 4 if parents is None else max(_depths(parents))
    if draft_kind == "self":  # the draft is the target: every step accepts the whole chain or a full path
        assert all(a == depth for a in out.accepted[:-1]), out.accepted
    assert out.steps == len(out.accepted) and sum(out.accepted) + out.steps >= 16


def _depths(parents):
    depth = [0] * len(parents)
    for i, p in enumerate(parents[1:], 1):
        depth[i] = depth[p] + 1
    return depth


def test_typical_at_temperature_zero_is_greedy(pair, gen):
    target = pair
    ids = torch.randint(0, V, (1, 4), generator=gen)
    want = target.generate(ids, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids))
    out = speculative.generate(target, _first_layer_of(target), ids, max_new_tokens=10, rule="typical",
                               temperature=0.0, parents=medusa_tree(8, 2))
    assert torch.equal(out.sequences, want)
    assert sum(out.accepted) > 0  # the cut target agrees often enough to accept something


def test_end_of_sequence_stops_like_generate(pair, gen):
    target = pair
    ids = torch.randint(0, V, (1, 5), generator=gen)
    free = target.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    eos = int(free[0, 5 + 6])  # the 7th new token becomes the end-of-sequence token
    want = target.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                           attention_mask=torch.ones_like(ids))
    out = speculative.generate(target, _first_layer_of(target), ids, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(out.sequences, want)
    assert int(out.sequences[0, -1]) == eos


# -- rejection sampling keeps the target's distribution -------------------------------------------------

SMALL_V = 6
RUNS = 1000


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rejection_samples_the_targets_joint_distribution(temperature, gen):
    """The first two new tokens' joint distribution over SMALL_V**2 cells against the target's exact
    p(t1) p(t2 | t1), over RUNS seeded runs; a draft that differs from the target, so both acceptances
    and residual samples occur."""
    from transformers import LlamaConfig

    target = _model(LlamaConfig, 2, 11, vocab=SMALL_V)
    draft = _model(LlamaConfig, 1, 12, vocab=SMALL_V)
    ids = torch.randint(0, SMALL_V, (1, 3), generator=gen)
    with torch.no_grad():
        p1 = torch.softmax(target(ids).logits[0, -1].double() / temperature, -1)
        both = torch.cat([ids.expand(SMALL_V, -1), torch.arange(SMALL_V)[:, None]], 1)
        p2 = torch.softmax(target(both).logits[:, -1].double() / temperature, -1)
    joint = (p1[:, None] * p2).reshape(-1).numpy()
    counts = np.zeros(SMALL_V * SMALL_V)
    accepted = 0
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    for run in range(RUNS):
        g = torch.Generator().manual_seed(seed + run)
        out = speculative.generate(target, draft, ids, max_new_tokens=2, num_draft=2, rule="rejection",
                                   temperature=temperature, generator=g)
        t1, t2 = out.sequences[0, 3:5].tolist()
        counts[t1 * SMALL_V + t2] += 1
        accepted += out.accepted[0]
    expected = joint * RUNS
    small = expected < 5  # pooled into one cell, as chi-square needs
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    pvalue = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    assert pvalue > P_MIN, (pvalue, counts, expected)
    assert 0 < accepted < 2 * RUNS  # drafts were accepted and rejected


def test_bad_arguments_raise_invalid_input(pair):
    target = pair
    ids = torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(InvalidInput, match=r"speculative.generate: argument 'input_ids': expected .* batches are not"):
        speculative.generate(target, target, torch.zeros(2, 3, dtype=torch.int64), max_new_tokens=2)
    with pytest.raises(InvalidInput, match=r"argument 'parents': expected None \(a chain\) for rule='rejection'"):
        speculative.generate(target, target, ids, max_new_tokens=2, rule="rejection", parents=[-1, 0, 0])
    with pytest.raises(InvalidInput, match=r"tree_attention_mask: argument 'parents'"):
        speculative.generate(target, target, ids, max_new_tokens=2, parents=[-1, 2, 0])
    with pytest.raises(InvalidInput, match=r"argument 'draft': expected the target's vocabulary size"):
        speculative.generate(target, _model(transformers.LlamaConfig, 1, 3, vocab=V + 1), ids, max_new_tokens=2)
    with pytest.raises(InvalidInput, match=r"argument 'rule': expected one of"):
        speculative.generate(target, target, ids, max_new_tokens=2, rule="beam")
