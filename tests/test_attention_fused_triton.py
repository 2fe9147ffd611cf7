"""The Triton attention kernels, run by the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by
conftest) at small sizes that still cover the issue's odd ones: forward and gradients through the spec's
compare rule. Correctness only; speed is ``gpu_check``'s business on a real GPU."""
from __future__ import annotations

import pytest
import torch

from core.ops.attention import SPEC
from plugins.fused import attention as fused
from test_attention_fused import _check, _sample

tri = pytest.importorskip("plugins.fused.triton.attention", reason="triton is not installed")

SHAPES = {  # (dtype, B, Hq, Hkv, Lq, Lk, D, extra)
    "lq113-lk203-d59-causal": (torch.float32, 1, 2, 1, 113, 203, 59, {"causal": True}),
    "lq113-lk203-d59": (torch.float16, 1, 1, 1, 113, 203, 59, {}),
    "lq1-causal": (torch.float32, 2, 2, 1, 1, 77, 32, {"causal": True}),
    "lq-gt-lk-causal": (torch.float32, 1, 2, 2, 90, 37, 16, {"causal": True}),
    "gqa-h6-kv2-causal": (torch.float32, 1, 6, 2, 40, 40, 16, {"causal": True}),
    "mqa": (torch.float32, 1, 4, 1, 33, 50, 16, {}),
    "fully-masked-row": (torch.float32, 1, 2, 2, 36, 44, 16, {"mask": "random"}),
    "mask-and-causal-lq-lt-lk": (torch.float32, 1, 2, 1, 30, 50, 16, {"mask": "random", "causal": True}),
    "bfloat16-causal": (torch.bfloat16, 1, 2, 2, 50, 70, 64, {"causal": True}),
    "float16-d80-dv48": (torch.float16, 1, 2, 2, 40, 40, 80, {"Dv": 48}),
}


@pytest.mark.parametrize("name", SHAPES)
def test_triton_forward_and_gradients(gen, name):
    dtype, B, Hq, Hkv, Lq, Lk, D, extra = SHAPES[name]
    _check(fused.TRITON, _sample(gen, dtype, B, Hq, Hkv, Lq, Lk, D, **extra), gen)


# Edge cases the Triton kernels decline (their dtypes are float16, bfloat16 and float32).
DECLINED = {"float64"}


@pytest.mark.parametrize("case", sorted(set(SPEC.edge_cases) - DECLINED))
def test_triton_on_the_specs_edge_cases(gen, case):
    _check(fused.TRITON, SPEC.edge_cases[case](gen, "cpu"), gen)


@pytest.mark.parametrize("case", sorted(SPEC.cases))
def test_triton_on_the_specs_cases_shrunk(gen, case):
    sample = SPEC.cases[case](gen, "cpu")
    _check(fused.TRITON, SPEC.shrink(sample.args, sample.attrs, gen), gen)


def test_triton_with_query_tiles_taller_than_key_tiles(gen, monkeypatch):
    # The interpreter's configs have BLOCK_M < BLOCK_N; the GPU's mostly BLOCK_M > BLOCK_N, where the
    # masked diagonal stage spans several key tiles. One config each, so the autotuner just runs it.
    import triton

    tall = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    for kernel in (tri._attn_fwd, tri._attn_bwd_dq, tri._attn_bwd_dkdv):
        monkeypatch.setattr(kernel, "configs", tall)
    _check(fused.TRITON, _sample(gen, torch.float32, 1, 2, 1, 100, 130, 24, causal=True), gen)
    _check(fused.TRITON, _sample(gen, torch.float32, 1, 2, 2, 90, 50, 16, causal=True), gen)


def test_gpu_check_runs_end_to_end_at_toy_sizes():
    # The real run needs a GPU (scripts/gpu_check.py); here its code path runs in the interpreter at toy
    # sizes with a wall-clock stand-in for triton.testing.do_bench, so a typo cannot wait for a device.
    import time

    def bench(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    checks = [("toy-gqa-causal", torch.float32, 1, 4, 2, 40, 24, 24, True, False),
              ("toy-mask", torch.float16, 1, 2, 2, 20, 30, 16, False, True)]
    rows = tri.gpu_check("cpu", checks=checks, timing=(1, 1, 32, 16), matmul_n=64, bench=bench)
    assert [r["case"] for r in rows[:2]] == ["toy-gqa-causal float32", "toy-mask float16"]
    assert all(r["ok"] for r in rows[:2]), rows[:2]
    assert len(rows) == 6 and all(r["ms"] > 0 for r in rows), rows


def test_gpu_autotune_pruning_keeps_fitting_configs():
    import triton

    def configs(table):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]

    def tiles(kept):
        return sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept)

    fwd, dq, dkdv = configs(tri.FWD_CONFIGS), configs(tri.DQ_CONFIGS), configs(tri.DKDV_CONFIGS)
    wide = {"BLOCK_D": 256, "BLOCK_DV": 256}
    narrow = {"BLOCK_D": 128, "BLOCK_DV": 64}
    assert tiles(tri._prune_fwd(fwd, {"Lq": 1}, **narrow)) == [(16, 64)]  # decoding: 16-row tiles only
    assert (16, 64) not in tiles(tri._prune_fwd(fwd, {"Lq": 4096}, **narrow))
    assert all(m * n <= 128 * 64 for m, n in tiles(tri._prune_fwd(fwd, {"Lq": 4096}, **wide)))
    assert tiles(tri._prune_fwd(dq, {"Lq": 4096}, **wide)) and tiles(tri._prune_bwd(dkdv, {"Lq": 4096}, **wide))
