"""decode_step: the contract on hand-built trees, the tree mask through attention, bad input, the key,
the compare rule, the dispatcher, and every built-in kernel through the conformance kit."""
from __future__ import annotations

import math

import pytest
import torch

from core import dispatcher
from core.errors import InvalidInput
from core.ops.decode_step import (SPEC, DecodeResult, chain, make_inputs, medusa_tree, tree_attention_mask, tree_of)
from core.spec import Sample
from core.tuning import judge
from plugins.fused.decode_step import decode_step as fused_kernel
from plugins.reference.decode_step import decode_step as reference
from plugins.torch_backend.decode_step import decode_step as torch_kernel
from registry.conformance import check_case, conformance_cases
from registry.loader import get_registry

KERNELS = {"reference": reference, "torch": torch_kernel, "fused": fused_kernel}
DEFAULTS = {"draft_probs": None, "rule": "greedy", "temperature": 1.0, "posterior_threshold": 0.09,
            "posterior_alpha": 0.3, "generator": None}


def _run(kernel, draft_tokens, parents, logits, **attrs):
    args, full = SPEC.prepare((draft_tokens, torch.tensor(parents), logits), {**DEFAULTS, **attrs})
    return KERNELS[kernel](*args, **full)


def _logits(rows):
    """[1, T, V] logits whose softmax rows are the given probabilities."""
    return torch.tensor(rows, dtype=torch.float64).log().float()[None]


# -- the tree ----------------------------------------------------------------------------------------

def _ancestors(parents, i):
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


def test_tree_structure_of_a_medusa_tree():
    parents = medusa_tree(64)
    assert len(parents) == 64 and parents[0] == -1
    assert all(0 <= p < i for i, p in enumerate(parents) if i)
    t = tree_of(tuple(parents))
    for i, path in enumerate(t.paths):
        assert set(path) == _ancestors(parents, i) and len(path) == t.depth[i] + 1
    assert t.max_depth == max(t.depth) and not t.is_chain and tree_of(tuple(chain(5))).is_chain
    by_path = sorted(range(64), key=lambda i: t.paths[i])
    assert [t.lex_rank[i] for i in by_path] == list(range(64))


def test_tree_attention_mask_is_ancestors_or_self(gen):
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, 20)]
    mask = tree_attention_mask(torch.tensor(parents))
    assert mask.dtype == torch.bool and mask.shape == (20, 20)
    for i in range(20):
        assert set(torch.nonzero(mask[i])[:, 0].tolist()) == _ancestors(parents, i)


def test_tree_attention_mask_verifies_a_tree_in_one_pass(gen):
    """One attention pass over prefix + tree with the tree mask equals attending each path on its own."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, 12)]
    T, L, H, D = len(parents), 5, 2, 8
    q = torch.randn(1, H, T, D, generator=gen, dtype=torch.float64)
    k = torch.randn(1, H, L + T, D, generator=gen, dtype=torch.float64)
    v = torch.randn(1, H, L + T, D, generator=gen, dtype=torch.float64)
    mask = torch.cat([torch.ones(T, L, dtype=torch.bool), tree_attention_mask(torch.tensor(parents))], 1)
    t = tree_of(tuple(parents))
    with dispatcher.use_backend("torch"):  # one kernel for both sides; every key length would tune anew
        together = dispatcher.attention(q, k, v, attn_mask=mask)
        for i, path in enumerate(t.paths):
            keys = list(range(L)) + [L + j for j in path]
            alone = dispatcher.attention(q[:, :, i:i + 1], k[:, :, keys], v[:, :, keys])
            assert torch.allclose(together[:, :, i:i + 1], alone, atol=1e-12), i


# -- semantics on hand-built inputs ------------------------------------------------------------------

@pytest.mark.parametrize("kernel", KERNELS)
def test_greedy_accepts_argmax_children_of_accepted_parents(kernel):
    #            0   1  2  3  4  5
    parents = [-1, 0, 0, 1, 2, 3]
    V = 5
    logits = torch.zeros(1, 6, V)
    logits[0, 0, 2] = 3  # argmax after the root: 2
    logits[0, 1, 4] = 3  # after node 1: 4
    logits[0, 2, 0] = 3
    logits[0, 3, 1] = 3  # after node 3: 1
    drafts = torch.tensor([[9 % V, 2, 3, 4, 0, 0]])  # node 1 passes, 2 fails, 3 passes, 4 (under 2) never, 5 fails
    out = _run(kernel, drafts, parents, logits)
    assert isinstance(out, DecodeResult)
    assert out.tokens.tolist() == [[2, 4, 1, -1]]
    assert out.num_accepted.tolist() == [2]
    assert out.accepted_nodes.tolist() == [[0, 1, 3, -1]]


@pytest.mark.parametrize("kernel", KERNELS)
def test_argmax_ties_go_to_the_lowest_token_id(kernel):
    logits = torch.tensor([[[1.0, 4.0, 0.0, 4.0], [4.0, 4.0, 4.0, 4.0]]])
    for token, passes in ((1, True), (3, False)):
        out = _run(kernel, torch.tensor([[0, token]]), [-1, 0], logits)
        assert out.num_accepted.tolist() == [int(passes)]
        assert out.tokens.tolist() == ([[1, 0]] if passes else [[1, -1]])


@pytest.mark.parametrize("kernel", KERNELS)
def test_equally_deep_paths_go_to_the_higher_log_probability_then_the_lower_indices(kernel):
    # Siblings 1 and 2 both propose the root's argmax; their children 3 (under 1) and 4 (under 2) both
    # propose their parent's argmax. Node 2's distribution is peakier, so the path through 4 scores higher.
    parents = [-1, 0, 0, 1, 2]
    logits = _logits([[0.1, 0.7, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0.9, 0.05, 0.03, 0.02],
                      [0.25] * 4, [0.25] * 4])
    drafts = torch.tensor([[0, 1, 1, 0, 0]])
    out = _run(kernel, drafts, parents, logits)
    assert out.accepted_nodes.tolist() == [[0, 2, 4]]
    # At temperature 0 every accepted token has log-probability 0: the tie goes to the lower indices.
    out = _run(kernel, drafts, parents, logits, temperature=0.0)
    assert out.accepted_nodes.tolist() == [[0, 1, 3]]
    # Deeper beats likelier: node 5 under node 3 proposes the argmax of a uniform row (0, the lowest id).
    deeper = torch.cat([logits, _logits([[0.25] * 4])], 1)
    out = _run(kernel, torch.tensor([[0, 1, 1, 0, 0, 0]]), parents + [3], deeper)
    assert out.accepted_nodes.tolist() == [[0, 1, 3, 5]] and out.num_accepted.tolist() == [3]


def tied_paths(gen, B, V, nudge=False):
    """Siblings 1 and 2 propose the root's argmax; row 2 is a fresh permutation of row 1, and their children
    3 and 4 propose each row's argmax, so the paths 0-1-3 and 0-2-4 have exactly equal float64 scores.
    ``nudge`` lowers row 2's second largest logit by one float32 ulp: path 0-2-4 then scores higher by
    about 1e-9, far below float32 resolution and far above float64's."""
    logits = torch.randn(B, 5, V, generator=gen) * 3
    for b in range(B):
        logits[b, 2] = logits[b, 1, torch.randperm(V, generator=gen)]
        if nudge:
            j = int(logits[b, 2].topk(2).indices[1])
            logits[b, 2, j] = torch.nextafter(logits[b, 2, j], torch.tensor(float("-inf")))
    top = logits.argmax(-1)
    drafts = torch.stack([torch.zeros(B, dtype=torch.int64), top[:, 0], top[:, 0], top[:, 1], top[:, 2]], 1)
    return drafts, [-1, 0, 0, 1, 2], logits


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rule, temperature", [("greedy", 1.0), ("typical", 0.7)])
def test_an_exact_tie_between_permuted_rows_goes_to_the_lower_indices(kernel, rule, temperature, gen):
    """Float32 row sums of permuted rows differ in their last bits; the float64 rule ties them exactly."""
    drafts, parents, logits = tied_paths(gen, 8, 1000)
    out = _run(kernel, drafts, parents, logits, rule=rule, temperature=temperature)
    assert out.accepted_nodes.tolist() == [[0, 1, 3]] * 8
    assert torch.equal(out.accepted_nodes, _run("reference", drafts, parents, logits, rule=rule,
                                                temperature=temperature).accepted_nodes)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rule, temperature", [("greedy", 1.0), ("typical", 0.7)])
def test_a_near_tie_below_float32_resolution_follows_float64(kernel, rule, temperature, gen):
    drafts, parents, logits = tied_paths(gen, 8, 1000, nudge=True)
    out = _run(kernel, drafts, parents, logits, rule=rule, temperature=temperature)
    assert out.accepted_nodes.tolist() == [[0, 2, 4]] * 8
    if rule == "greedy":
        assert torch.equal(out.tokens, _run("reference", drafts, parents, logits).tokens)


@pytest.mark.parametrize("kernel", KERNELS)
def test_typical_threshold_is_min_of_cap_and_alpha_exp_minus_entropy(kernel):
    p = [0.5, 0.3, 0.15, 0.05]
    entropy = -sum(x * math.log(x) for x in p)
    logits = _logits([p, [0.25] * 4])
    cap = 0.09
    cutoff = min(cap, 0.3 * math.exp(-entropy))
    for token in range(4):
        out = _run(kernel, torch.tensor([[0, token]]), [-1, 0], logits, rule="typical", temperature=1.0)
        assert out.num_accepted.tolist() == [int(p[token] > cutoff)], (token, cutoff)
    # a raised cap lets alpha * exp(-H) decide: 0.3 * exp(-1.14) = 0.096 > 0.05 still rejects token 3, 0.15 passes
    out = _run(kernel, torch.tensor([[0, 2]]), [-1, 0], logits, rule="typical", posterior_threshold=0.5)
    assert out.num_accepted.tolist() == [int(0.15 > min(0.5, 0.3 * math.exp(-entropy)))]
    # temperature sharpens p: at T = 0.5 token 1 has p = 0.09 / 0.3525 (computed by hand below)
    sharp = [x * x for x in p]
    sharp = [x / sum(sharp) for x in sharp]
    h = -sum(x * math.log(x) for x in sharp)
    out = _run(kernel, torch.tensor([[0, 1]]), [-1, 0], logits, rule="typical", temperature=0.5)
    assert out.num_accepted.tolist() == [int(sharp[1] > min(cap, 0.3 * math.exp(-h)))]


@pytest.mark.parametrize("kernel", KERNELS)
def test_typical_at_temperature_zero_is_greedy(kernel, gen):
    sample = make_inputs(gen, "cpu", B=4, parents=medusa_tree(20), V=50, rule="typical", temperature=0.0)
    args, attrs = SPEC.prepare(sample.args, sample.attrs)
    typical = KERNELS[kernel](*args, **attrs)
    greedy = KERNELS[kernel](*args, **{**attrs, "rule": "greedy"})
    for a, b in zip(typical, greedy):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", KERNELS)
def test_rejection_never_accepts_a_token_the_draft_could_not_draw(kernel):
    V = 6
    logits = torch.zeros(3, 3, V)  # p uniform: p / q = inf where q = 0 would be accepted if the rule forgot it
    q = torch.full((3, 3, V), 1.0 / (V - 1))
    q[:, :, 4] = 0.0
    drafts = torch.tensor([[0, 4, 1]] * 3)
    out = _run(kernel, drafts, chain(2), logits, rule="rejection", draft_probs=q)
    assert out.num_accepted.tolist() == [0, 0, 0]
    # the extra token comes from max(p - q, 0), which is all at token 4
    assert out.tokens.tolist() == [[4, -1, -1]] * 3


@pytest.mark.parametrize("kernel", KERNELS)
def test_rejection_accepts_when_draft_equals_target_and_at_temperature_zero_is_greedy(kernel, gen):
    logits = torch.randn(2, 4, 30, generator=gen)
    q = torch.softmax(logits.double(), -1).float()
    q = torch.cat([q[:, :1], q[:, :-1]], 1)  # node j was drawn from the target's distribution at j - 1
    drafts = torch.stack([torch.cat([torch.zeros(1, dtype=torch.int64), logits[b, :-1].argmax(-1)]) for b in range(2)])
    out = _run(kernel, drafts, chain(3), logits, rule="rejection", draft_probs=q, temperature=0.0)
    greedy = _run(kernel, drafts, chain(3), logits, rule="greedy")
    assert out.num_accepted.tolist() == [3, 3] and torch.equal(out.tokens, greedy.tokens)


@pytest.mark.parametrize("kernel", KERNELS)
def test_root_only_tree_and_empty_batch(kernel, gen):
    logits = torch.randn(3, 1, 17, generator=gen)
    out = _run(kernel, torch.zeros(3, 1, dtype=torch.int64), [-1], logits)
    assert out.tokens.tolist() == [[i] for i in logits[:, 0].argmax(-1).tolist()]
    assert out.num_accepted.tolist() == [0, 0, 0] and out.accepted_nodes.tolist() == [[0]] * 3
    out = _run(kernel, torch.zeros(0, 3, dtype=torch.int64), chain(2), torch.randn(0, 3, 17))
    assert out.tokens.shape == (0, 3) and out.num_accepted.shape == (0,) and out.accepted_nodes.shape == (0, 3)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rule", ["typical", "rejection"])
def test_a_generator_makes_sampling_reproducible(kernel, rule, gen):
    sample = make_inputs(gen, "cpu", B=6, parents=chain(3), V=40, rule=rule)
    args, attrs = SPEC.prepare(sample.args, sample.attrs)
    runs = [KERNELS[kernel](*args, **{**attrs, "generator": torch.Generator().manual_seed(7)}) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule, B, parents", [("rejection", 64, chain(5)), ("typical", 8, medusa_tree(64))])
def test_full_vocabulary(rule, B, parents, gen):
    """V = 151,936 (B = 64 on a chain, a Medusa tree of 64): the fused kernel judged against the reference
    (the torch kernel meets this V in the conformance case greedy-chain5-b4-v151936)."""
    sample = make_inputs(gen, "cpu", B=B, parents=parents, V=151936, rule=rule, temperature=0.8)
    args, attrs = SPEC.prepare(sample.args, sample.attrs)
    out = fused_kernel(*args, **attrs)
    assert 0 <= int(out.tokens.max()) < 151936 and bool(((out.tokens >= 0) | (out.tokens == -1)).all())
    verdict = judge(SPEC, out, reference(*args, **attrs), Sample(args=args, attrs=attrs))
    assert verdict.ok, verdict.reason


COLUMN_ZERO_CASES = {
    "greedy": dict(B=3, parents=medusa_tree(16), V=120, rule="greedy", agree=0.95),
    "typical": dict(B=3, parents=medusa_tree(16), V=120, rule="typical", temperature=0.8),
    "typical-t0": dict(B=3, parents=medusa_tree(16), V=120, rule="typical", temperature=0.0),
    "rejection": dict(B=4, parents=chain(4), V=120, rule="rejection"),
}


def with_column_zero(args, attrs, value, seed):
    """The call with draft_tokens[:, 0] = value and a fresh generator seeded with ``seed`` (make_inputs
    leaves column 0 a random valid id)."""
    drafts = args[0].clone()
    drafts[:, 0] = value
    return (drafts, *args[1:]), {**attrs, "generator": torch.Generator().manual_seed(seed)}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", COLUMN_ZERO_CASES)
def test_column_zero_of_draft_tokens_is_never_read(kernel, case, gen):
    """Column 0 (the root's committed token) is not used: -1 or V + 3 there changes nothing."""
    sample = make_inputs(gen, "cpu", **COLUMN_ZERO_CASES[case])
    args, attrs = SPEC.prepare(sample.args, sample.attrs)
    V = args[2].shape[-1]
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    ref = reference(*args, **with_column_zero(args, attrs, 0, seed)[1])
    clean = KERNELS[kernel](*args, **with_column_zero(args, attrs, 0, seed)[1])
    for value in (-1, V + 3):
        bad_args, bad_attrs = with_column_zero(args, attrs, value, seed)
        out = KERNELS[kernel](*bad_args, **bad_attrs)
        verdict = judge(SPEC, out, ref, Sample(args=bad_args, attrs=bad_attrs))
        assert verdict.ok, (value, verdict.reason)
        for a, b in zip(out, clean):  # the same uniforms: the same answer as with a valid column 0
            assert torch.equal(a, b), value
        if case in ("greedy", "typical-t0"):
            for a, b in zip(out, ref):
                assert torch.equal(a, b), value


def non_finite_logits(gen, B, T, V):
    """Random logits with NaN entries, +inf entries, a row of only NaN and a row of only -inf."""
    x = torch.randn(B, T, V, generator=gen) * 3
    x[0, 0, 5] = float("nan")
    x[0, 1, 7] = float("inf")
    x[1 % B, 0] = float("nan")
    x[1 % B, T - 1] = float("-inf")
    x[2 % B, T // 2, ::3] = float("inf")
    x[2 % B, 0, 1::2] = float("nan")
    return x


def assert_well_formed(out, draft_tokens, parents, V):
    """The result's own consistency, checked from the contract alone: a path of the tree from the root,
    its draft tokens, one more token in [0, V), -1 padding."""
    width = max(len(p) for p in tree_of(tuple(parents)).paths)
    assert out.tokens.shape == out.accepted_nodes.shape == (draft_tokens.shape[0], width)
    for b, (tokens, nodes, num) in enumerate(zip(out.tokens.tolist(), out.accepted_nodes.tolist(),
                                                 out.num_accepted.tolist())):
        path = nodes[:num + 1]
        assert path[0] == 0 and all(parents[j] == i for i, j in zip(path, path[1:])), nodes
        assert nodes[num + 1:] == [-1] * (width - num - 1) and tokens[num + 1:] == nodes[num + 1:]
        assert tokens[:num] == [int(draft_tokens[b, i]) for i in path[1:]]
        assert 0 <= tokens[num] < V, tokens


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, on the reference's inf - inf
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rule, temperature", [("greedy", 1.0), ("greedy", 0.0), ("typical", 0.7), ("typical", 0.0),
                                               ("rejection", 1.0), ("rejection", 0.0)])
def test_non_finite_logits_never_crash_and_keep_ids_in_range(kernel, rule, temperature, gen):
    """Outside the precondition (documented, not checked) the answer is unspecified but well formed."""
    B, V = 3, 50
    parents = chain(4) if rule == "rejection" else [-1, 0, 0, 1, 2, 3]
    sample = make_inputs(gen, "cpu", B=B, parents=parents, V=V, rule=rule, temperature=temperature, agree=0.9)
    args, attrs = SPEC.prepare(sample.args, sample.attrs)
    logits = non_finite_logits(gen, B, len(parents), V)
    out = KERNELS[kernel](args[0], args[1], logits, **attrs)
    assert_well_formed(out, args[0], parents, V)


# -- bad input ---------------------------------------------------------------------------------------

def _good():
    B, T, V = 2, 4, 10
    return (torch.zeros(B, T, dtype=torch.int64), torch.tensor(chain(3)), torch.randn(B, T, V)), {}


def _probs(B=2, T=4, V=10):
    return torch.softmax(torch.randn(B, T, V), -1)


def _negative_probs():
    """Rows that still sum to 1, with one negative entry."""
    q = _probs()
    q[0, 1, 0] -= 1.0  # a softmax entry is below 1: always negative now (0.5 was not, now and then)
    q[0, 1, 1] += 1.0
    return q


BAD = [
    (lambda d, p, x: ((d, torch.tensor([0, 0, 1, 2]), x), {}), "argument 'parents': expected parents[0] == -1"),
    (lambda d, p, x: ((d, torch.tensor([-1, 0, 2, 2]), x), {}), "expected 0 <= parents[2] < 2 (every parent index below its child), got parents[2] = 2"),
    (lambda d, p, x: ((d, torch.tensor([-1, 0, 1, 2, 3]), x), {}), "argument 'parents': expected shape [T] = [4]"),
    (lambda d, p, x: ((d[:1], p, x), {}), "argument 'draft_tokens': expected shape [B, T] = [2, 4]"),
    (lambda d, p, x: ((d[:, :3], p, x), {}), "got shape [2, 3]"),
    (lambda d, p, x: ((d.int(), p, x), {}), "argument 'draft_tokens': expected dtype torch.int64"),
    (lambda d, p, x: ((d + 10, p, x), {}), "argument 'draft_tokens': expected token ids in [0, 10)"),
    (lambda d, p, x: ((d, p, x.int()), {}), "argument 'target_logits': expected dtype one of"),
    (lambda d, p, x: ((d, p, x[0]), {}), "argument 'target_logits': expected a 3-D tensor [B, T, V]"),
    (lambda d, p, x: ((d, p, x), {"rule": "sampling"}), "argument 'rule': expected one of ['greedy', 'typical', 'rejection'], got 'sampling'"),
    (lambda d, p, x: ((d, p, x), {"temperature": -0.5}), "argument 'temperature': expected a finite float >= 0 (0 means the argmax), got -0.5"),
    (lambda d, p, x: ((d, p, x), {"temperature": float("nan")}), "argument 'temperature': expected a finite float"),
    (lambda d, p, x: ((d, p, x), {"posterior_alpha": -1.0}), "argument 'posterior_alpha': expected a finite float >= 0"),
    (lambda d, p, x: ((d, p, x), {"generator": 3}), "argument 'generator': expected a torch.Generator or None, got int"),
    (lambda d, p, x: ((d, p, x), {"rule": "rejection"}), "argument 'draft_probs': expected the draft distributions [B, T, V] (rule='rejection' needs them), got None"),
    (lambda d, p, x: ((d, p, x), {"rule": "rejection", "draft_probs": _probs(V=9)}), "argument 'draft_probs': expected shape [2, 4, 10]"),
    (lambda d, p, x: ((d, p, x), {"rule": "rejection", "draft_probs": _negative_probs()}), "expected probabilities >= 0 in rows 1..T-1"),
    (lambda d, p, x: ((d, p, x), {"rule": "rejection", "draft_probs": _probs() * 1.01}), "expected rows 1..T-1 summing to 1 within 0.001, got a row sum off by 0.01"),
    (lambda d, p, x: ((d, torch.tensor([-1, 0, 0, 1]), x), {"rule": "rejection", "draft_probs": _probs()}),
     "argument 'parents': expected a chain (parents[i] == i - 1) for rule='rejection', got parents[2] = 0: speculative sampling"),
    (lambda d, p, x: ((d, p, x), {"beam": 2}), "argument 'beam': expected one of the attributes"),
]


@pytest.mark.parametrize("make, message", BAD, ids=range(len(BAD)))
def test_bad_input_names_op_argument_and_values(make, message):
    (d, p, x), _ = _good()
    args, attrs = make(d, p, x)
    with pytest.raises(InvalidInput) as info:
        dispatcher.decode_step(*args, **attrs)
    assert message in str(info.value) and str(info.value).startswith("decode_step"), str(info.value)


def test_tree_attention_mask_rejects_a_bad_tree():
    with pytest.raises(InvalidInput, match=r"expected 0 <= parents\[1\] < 1"):
        tree_attention_mask(torch.tensor([-1, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_tree_attention_mask_rejects_a_non_integer_tensor(dtype):
    with pytest.raises(InvalidInput) as info:
        tree_attention_mask(torch.tensor([-1, 0, 1]).to(dtype))
    assert str(info.value) == (f"tree_attention_mask: argument 'parents': expected an integer tensor of parent "
                               f"indices (dtype torch.int64, as decode_step takes it), got dtype {dtype}")


def test_tree_attention_mask_takes_any_integer_dtype():
    parents = torch.tensor([-1, 0, 1, 0])
    want = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    for dtype in (torch.int64, torch.int32, torch.int16):
        assert tree_attention_mask(parents.to(dtype)).int().tolist() == want


# -- key, samples, compare rule ----------------------------------------------------------------------

def test_key_excludes_the_generator_and_keeps_what_changes_the_kernel(gen):
    sample = make_inputs(gen, "cpu", B=3, parents=medusa_tree(10), V=100, rule="typical")
    args, attrs = SPEC.prepare(sample.args, sample.attrs)
    key = SPEC.key(args, attrs)
    assert SPEC.key(args, {**attrs, "generator": torch.Generator()}) == key
    assert SPEC.key(args, {**attrs, "temperature": 0.5}) == key
    assert SPEC.key(args, {**attrs, "temperature": 0.0}) != key
    assert SPEC.key(args, {**attrs, "rule": "greedy"}) != key
    assert key[:6] == ("typical", "cpu", "torch.float32", 4, 10, 128)


def test_shrink_and_synthesize_never_touch_the_callers_generator(gen):
    sample = make_inputs(gen, "cpu", B=8, parents=chain(4), V=3000, rule="rejection")
    args, attrs = SPEC.prepare(sample.args, sample.attrs)
    mine = attrs["generator"]
    state = mine.get_state().clone()
    for make in (SPEC.shrink, SPEC.synthesize):
        new = make(args, attrs, gen)
        assert new.attrs["generator"] is not mine and new.attrs["draft_probs"] is not attrs["draft_probs"]
        SPEC.verify(new.args, dict(new.attrs))
        same = lambda key: key[:3] + key[4:5] + key[6:]  # noqa: E731  (all but the bucketed B and V)
        assert same(SPEC.key(new.args, new.attrs)) == same(SPEC.key(args, attrs))
        assert not any(a is b for a, b in zip(new.args[::2], args[::2]))
    assert torch.equal(mine.get_state(), state)
    assert SPEC.shrink(args, attrs, gen).args[2].shape == (3, 5, 1000)


def test_compare_rule_catches_wrong_answers(gen):
    sample = make_inputs(gen, "cpu", B=3, parents=medusa_tree(30), V=200, rule="greedy", agree=0.95)
    args, attrs = SPEC.prepare(sample.args, sample.attrs)
    s = Sample(args=args, attrs=attrs)
    ref = reference(*args, **attrs)
    assert judge(SPEC, ref, ref, s).ok
    row = int(torch.argmax(ref.num_accepted))
    n = int(ref.num_accepted[row])
    assert n > 0
    # a wrong extra token
    bad = ref.tokens.clone()
    bad[row, n] = (bad[row, n] + 1) % 200
    assert "extra token" in judge(SPEC, DecodeResult(bad, ref.num_accepted, ref.accepted_nodes), ref, s).reason
    # a shorter path than the reference's, consistently reported
    nodes, tokens, num = ref.accepted_nodes.clone(), ref.tokens.clone(), ref.num_accepted.clone()
    nodes[row, n:] = -1
    tokens[row, n - 1] = int(torch.argmax(args[2][row, int(nodes[row, n - 1])]))
    tokens[row, n:] = -1
    num[row] = n - 1
    verdict = judge(SPEC, DecodeResult(tokens, num, nodes), ref, s)
    assert not verdict.ok and "the reference's is" in verdict.reason
    # tokens that do not follow the path
    bad = ref.tokens.clone()
    bad[row, 0] = -1
    assert "do not follow accepted_nodes" in judge(SPEC, DecodeResult(bad, ref.num_accepted, ref.accepted_nodes), ref, s).reason
    # not a named result
    assert "expected a DecodeResult" in judge(SPEC, tuple(ref), ref, s).reason


@pytest.mark.parametrize("rule", ["greedy", "typical"])
def test_compare_rule_requires_the_reference_path_on_near_and_exact_ties(rule):
    # Siblings 1 and 2 propose the root's argmax; their children 3 and 4 propose the argmax of rows that
    # differ by 1e-9. The contract wants the reference's path exactly (the kernels re-score such near
    # ties in float64), so only the higher path is right; an exact tie must go to the lower indices.
    parents = torch.tensor([-1, 0, 0, 1, 2])
    row = [0.4, 0.3, 0.2, 0.1]
    tied = _logits([[0.1, 0.7, 0.1, 0.1], row, row, [0.25] * 4, [0.25] * 4]).double()
    near = tied.clone()
    near[0, 2, 0] += 1e-9
    drafts = torch.tensor([[0, 1, 1, 0, 0]])
    low = DecodeResult(torch.tensor([[1, 0, 0]]), torch.tensor([2]), torch.tensor([[0, 1, 3]]))
    high = DecodeResult(torch.tensor([[1, 0, 0]]), torch.tensor([2]), torch.tensor([[0, 2, 4]]))
    attrs = {**DEFAULTS, "rule": rule}
    args, attrs = SPEC.prepare((drafts, parents, near), attrs)
    ref = reference(*args, **attrs)
    assert ref.accepted_nodes.tolist() == [[0, 2, 4]]
    assert judge(SPEC, high, ref, Sample(args=args, attrs=attrs)).ok
    verdict = judge(SPEC, low, ref, Sample(args=args, attrs=attrs))
    assert not verdict.ok and "the reference's is [0, 2, 4]" in verdict.reason
    args, attrs = SPEC.prepare((drafts, parents, tied), attrs)
    ref = reference(*args, **attrs)
    assert ref.accepted_nodes.tolist() == [[0, 1, 3]]
    assert judge(SPEC, low, ref, Sample(args=args, attrs=attrs)).ok
    assert not judge(SPEC, high, ref, Sample(args=args, attrs=attrs)).ok


def test_compare_rule_for_rejection_catches_an_impossible_rejection():
    logits = torch.zeros(1, 3, 5)  # p uniform, 0.2 each
    q = torch.tensor([0.225, 0.225, 0.225, 0.1, 0.225]).expand(1, 3, 5)
    args, attrs = SPEC.prepare((torch.tensor([[0, 3, 1]]), torch.tensor(chain(2)), logits),
                               {**DEFAULTS, "rule": "rejection", "draft_probs": q})
    s = Sample(args=args, attrs=attrs)
    ref = reference(*args, **attrs)
    assert ref.num_accepted.tolist()[0] >= 1 and judge(SPEC, ref, ref, s).ok
    # node 1's token 3 has p = 0.2 >= q = 0.1: it is accepted with probability 1
    rejected = DecodeResult(torch.tensor([[3, -1, -1]]), torch.tensor([0]), torch.tensor([[0, -1, -1]]))
    assert "rejected though p >= q" in judge(SPEC, rejected, ref, s).reason
    # after a rejection of node 2 (token 1: p = 0.2 < q = 0.225) the extra token must come from max(p - q, 0)
    outside = DecodeResult(torch.tensor([[3, 0, -1]]), torch.tensor([1]), torch.tensor([[0, 1, -1]]))
    assert "outside the residual" in judge(SPEC, outside, ref, s).reason
    inside = DecodeResult(torch.tensor([[3, 3, -1]]), torch.tensor([1]), torch.tensor([[0, 1, -1]]))
    assert judge(SPEC, inside, ref, s).ok


# -- the dispatcher and the conformance kit ----------------------------------------------------------

def test_dispatcher_end_to_end_and_explain(gen):
    sample = make_inputs(gen, "cpu", B=3, parents=medusa_tree(24), V=500, rule="typical", temperature=0.6)
    args, attrs = sample.args, dict(sample.attrs)
    out = dispatcher.decode_step(*args, **attrs)
    ref = reference(*SPEC.prepare(args, attrs)[0], **SPEC.prepare(args, attrs)[1])
    assert judge(SPEC, out, ref, Sample(args=args, attrs=SPEC.prepare(args, attrs)[1])).ok
    explanation = dispatcher.explain("decode_step", *args, **attrs)
    rows = {r.backend: r for r in explanation.rows}
    assert {"reference", "torch", "fused"} <= set(rows)
    assert explanation.chosen in rows and rows[explanation.chosen].status == "chosen"
    assert all(r.status in ("chosen", "ok") for r in rows.values()), explanation.table()
    assert "decode_step(" in str(explanation) and "generator=" in explanation.call


def test_each_backend_through_the_dispatcher(gen):
    sample = make_inputs(gen, "cpu", B=2, parents=chain(4), V=300, rule="rejection")
    args, attrs = SPEC.prepare(sample.args, sample.attrs)
    for backend in ("reference", "torch", "fused"):
        with dispatcher.use_backend(backend):
            out = dispatcher.decode_step(*args, **attrs)
        assert judge(SPEC, out, reference(*args, **attrs), Sample(args=args, attrs=attrs)).ok, backend


BUILTIN = [c for backend in ("reference", "torch", "fused") for c in conformance_cases(backend, ops=["decode_step"])]


@pytest.mark.parametrize("case", BUILTIN, ids=str)
def test_builtin_kernels_conform(case):
    check_case(case)


def test_fused_declares_float64_unsupported_with_a_reason():
    sample = make_inputs(torch.Generator().manual_seed(0), "cpu", B=1, parents=chain(2), V=10, dtype=torch.float64)
    fused = next(k for k in get_registry().kernels_for("decode_step") if k.backend == "fused")
    reasons = fused.not_supported_reasons(*sample.args, **sample.attrs)
    assert reasons and "float64" in reasons[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_draft_probs_row_sums_are_judged_as_a_float64_sum_judges_them(dtype, gen):
    """verify sums draft_probs in float32 chunks and re-sums in float64 only rows near the tolerance:
    rows scaled to just inside and just outside it are accepted and rejected as the float64 sum says."""
    from core.ops.decode_step import PROB_SUM_TOL, _row_sums_within

    q = torch.softmax(torch.randn(3, 4, 5000, generator=gen, dtype=torch.float64), -1).to(dtype)
    tol = max(PROB_SUM_TOL, float(torch.finfo(dtype).eps))
    for scale in (1 - tol * 1.0001, 1 - tol * 0.9999, 1 + tol * 0.9999, 1 + tol * 1.0001, 1.0, 1.5):
        rows = q.clone()
        rows[1, 2] = (rows[1, 2].double() * scale / rows[1, 2].double().sum()).to(dtype)
        want = bool(((rows.sum(-1, dtype=torch.float64) - 1).abs() <= tol).all())
        assert _row_sums_within(rows, tol) == want, scale
