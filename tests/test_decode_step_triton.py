"""The Triton decode_step kernel, run by the interpreter on CPU tensors (TRITON_INTERPRET=1, set in
conftest): its row statistics against float64, and the whole fused CUDA path (Triton statistics, then
the torch backend's ``finish``) judged by the op's compare rule. Sizes are small: the interpreter runs
every program in numpy. Speed and the autotuned block sizes are ``gpu_check``'s business on a GPU."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernel cannot be tested")

from core.ops.decode_step import EDGE_CASES, SPEC, chain, make_inputs, medusa_tree  # noqa: E402
from core.spec import Sample  # noqa: E402
from core.tuning import judge  # noqa: E402
from plugins.fused.decode_step import _cuda as fused_cuda_path  # noqa: E402
from plugins.fused.triton.decode_step import row_stats  # noqa: E402
from plugins.reference.decode_step import decode_step as reference  # noqa: E402
from test_decode_step import (COLUMN_ZERO_CASES, DEFAULTS, assert_well_formed, non_finite_logits,  # noqa: E402
                              tied_paths, with_column_zero)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1e-30])
def test_row_stats_match_float64(dtype, temperature, gen):
    x = (torch.randn(2, 3, 301, generator=gen) * 3).to(dtype)
    x[0, 1, 250:] = float("-inf")  # a masked tail
    x[1, 2, :130] = float("-inf")  # a masked head: the first blocks see only -inf
    x[1, 0, [7, 200]] = 50  # a tie for the max across blocks: the lower index wins
    stats = row_stats(x, temperature, entropy=True)
    xd = x.double()
    assert torch.equal(stats.argmax, xd.argmax(-1)) and stats.argmax[1, 0] == 7
    assert torch.equal(stats.max.double(), xd.amax(-1))
    if temperature == 0:
        assert stats.log_sum is None and stats.entropy is None
        return
    z = (xd - xd.amax(-1, keepdim=True)) / temperature
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    entropy = -(p * torch.where(p > 0, torch.log_softmax(z, -1), 0.0)).sum(-1)
    assert torch.allclose(stats.log_sum.double(), lse, atol=1e-5, rtol=1e-5)
    assert torch.allclose(stats.entropy.double(), entropy, atol=1e-5, rtol=1e-5)


def test_row_stats_of_a_single_entry_vocabulary():
    stats = row_stats(torch.tensor([[[2.5], [-1.0]]]), 1.0, entropy=True)
    assert stats.argmax.tolist() == [[0, 0]] and stats.max.tolist() == [[2.5, -1.0]]
    assert stats.log_sum.tolist() == [[0.0, 0.0]] and stats.entropy.tolist() == [[0.0, 0.0]]
    assert not math.isnan(float(stats.entropy.sum()))


SMALL = {
    "greedy-tree": dict(B=2, parents=medusa_tree(16), V=200, rule="greedy"),
    "typical-tree": dict(B=2, parents=medusa_tree(16), V=200, rule="typical", temperature=0.7),
    "rejection-chain": dict(B=3, parents=chain(4), V=150, rule="rejection"),
    "typical-bfloat16": dict(B=2, parents=chain(3), V=100, rule="typical", dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", [*SMALL, "ties-t0", "masked-vocab", "rejection-sparse-draft"])
def test_fused_cuda_path_conforms_under_the_interpreter(name, gen):
    sample = make_inputs(gen, "cpu", **SMALL[name]) if name in SMALL else EDGE_CASES[name](gen, "cpu")
    args, attrs = SPEC.prepare(sample.args, sample.attrs)
    out = fused_cuda_path(*args, **attrs)
    verdict = judge(SPEC, out, reference(*args, **attrs), Sample(args=args, attrs=attrs))
    assert verdict.ok, verdict.reason


def _run(draft_tokens, parents, logits, **attrs):
    args, full = SPEC.prepare((draft_tokens, torch.tensor(parents), logits), {**DEFAULTS, **attrs})
    return fused_cuda_path(*args, **full), reference(*args, **full)


@pytest.mark.parametrize("case", COLUMN_ZERO_CASES)
def test_fused_cuda_path_never_reads_column_zero(case, gen):
    sample = make_inputs(gen, "cpu", **COLUMN_ZERO_CASES[case])
    args, attrs = SPEC.prepare(sample.args, sample.attrs)
    V = args[2].shape[-1]
    clean = fused_cuda_path(*args, **with_column_zero(args, attrs, 0, 5)[1])
    ref = reference(*args, **with_column_zero(args, attrs, 0, 5)[1])
    for value in (-1, V + 3):
        bad_args, bad_attrs = with_column_zero(args, attrs, value, 5)
        out = fused_cuda_path(*bad_args, **bad_attrs)
        verdict = judge(SPEC, out, ref, Sample(args=bad_args, attrs=bad_attrs))
        assert verdict.ok, (value, verdict.reason)
        for a, b in zip(out, clean):
            assert torch.equal(a, b), value


@pytest.mark.parametrize("rule, temperature", [("greedy", 1.0), ("typical", 0.7)])
def test_fused_cuda_path_breaks_exact_and_near_ties_like_the_reference(rule, temperature, gen):
    drafts, parents, logits = tied_paths(gen, 4, 300)
    out, ref = _run(drafts, parents, logits, rule=rule, temperature=temperature)
    assert out.accepted_nodes.tolist() == ref.accepted_nodes.tolist() == [[0, 1, 3]] * 4
    drafts, parents, logits = tied_paths(gen, 4, 300, nudge=True)
    out, ref = _run(drafts, parents, logits, rule=rule, temperature=temperature)
    assert out.accepted_nodes.tolist() == ref.accepted_nodes.tolist() == [[0, 2, 4]] * 4


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, inside the interpreter, on inf - inf
@pytest.mark.parametrize("rule, temperature", [("greedy", 1.0), ("typical", 0.7), ("typical", 0.0), ("rejection", 1.0)])
def test_fused_cuda_path_with_non_finite_logits_keeps_ids_in_range(rule, temperature, gen):
    B, V = 3, 70  # V not a multiple of the interpreter's block: the last block has masked lanes
    parents = chain(4) if rule == "rejection" else [-1, 0, 0, 1, 2, 3]
    sample = make_inputs(gen, "cpu", B=B, parents=parents, V=V, rule=rule, temperature=temperature, agree=0.9)
    args, attrs = SPEC.prepare(sample.args, sample.attrs)
    out = fused_cuda_path(args[0], args[1], non_finite_logits(gen, B, len(parents), V), **attrs)
    assert_well_formed(out, args[0], parents, V)
