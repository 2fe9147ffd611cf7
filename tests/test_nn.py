"""core.nn: Attention (kv cache decoding == full sequence, against float64 SDPA math), DelayedScalingCast
(Transformer Engine's recipe computed by hand), KNNIndex (against FAISS), each through state_dict, .to(),
train()/eval() and torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from core.errors import InvalidInput
from core.nn import Attention, DelayedScalingCast, KNNIndex


@pytest.fixture(autouse=True)
def _quick(monkeypatch):
    monkeypatch.setenv("SWITCHYARD_TUNE_BUDGET", "0.005")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _reference_attention(m: Attention, x: torch.Tensor) -> torch.Tensor:
    """The module's math in float64 with torch's SDPA (top-left causal equals bottom-right for Lq == Lk)."""
    x = x.double()
    B, L, E = x.shape
    W = {n: p.detach().double() for n, p in m.named_parameters()}
    q = (x @ W["q_proj.weight"].T).view(B, L, m.num_heads, m.head_dim).transpose(1, 2)
    k = (x @ W["k_proj.weight"].T).view(B, L, m.num_kv_heads, m.head_dim).transpose(1, 2)
    v = (x @ W["v_proj.weight"].T).view(B, L, m.num_kv_heads, m.head_dim).transpose(1, 2)
    g = m.num_heads // m.num_kv_heads
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)
    return o.transpose(1, 2).reshape(B, L, E) @ W["out_proj.weight"].T


def test_attention_kv_cache_decoding_equals_full_sequence(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = Attention(32, 4, 2, causal=True)
    x = torch.randn(2, 11, 32, generator=gen)
    full, (k, v) = m(x)
    assert k.shape == (2, 2, 11, 8) and v.shape == (2, 2, 11, 8)
    torch.testing.assert_close(full.double(), _reference_attention(m, x), rtol=1e-4, atol=1e-5)
    out, cache = m(x[:, :6])  # a prompt, then one token at a time against the cache
    steps = [out]
    for t in range(6, 11):
        out, cache = m(x[:, t:t + 1], kv_cache=cache)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-6)
    # the projection of 6 rows then 1 row at a time need not round like one of 11 rows (BLAS blocks by
    # the row count), so the cache equals the full sequence's keys to float32 rounding, not bitwise
    torch.testing.assert_close(cache[0], k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache[1], v, rtol=1e-5, atol=1e-6)


def test_attention_module_state_dict_to_mask_and_compile(gen):
    m = Attention(16, 4, causal=False, bias=True)
    x = torch.randn(3, 5, 16, generator=gen)
    mask = torch.rand(3, 1, 5, 5, generator=gen) < 0.7
    mask[..., 0] = True
    want, _ = m(x, attn_mask=mask)
    copy = Attention(16, 4, causal=False, bias=True)
    copy.load_state_dict(m.state_dict())
    torch.testing.assert_close(copy(x, attn_mask=mask)[0], want, rtol=0, atol=0)
    m64 = copy.to(torch.float64)
    torch.testing.assert_close(m64(x.double(), attn_mask=mask)[0].float(), want, rtol=1e-4, atol=1e-5)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, attn_mask=mask)[0], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInput, match=r"Attention: argument 'num_kv_heads': expected a divisor of num_heads=4"):
        Attention(16, 4, 3)


def _te_scale(amax: float, fp8_max: float, margin: int, previous: float) -> float:
    """Transformer Engine's documented default: sf = fp8_max / amax / 2**margin, unchanged where amax is 0."""
    return previous if amax == 0 else fp8_max / amax / 2 ** margin


def _cast(x: torch.Tensor, scale: float, dtype: torch.dtype, fp8_max: float) -> torch.Tensor:
    v = (x.double() * torch.tensor(scale, dtype=torch.float32).double()).float()
    return v.clamp(-fp8_max, fp8_max).to(dtype)  # saturating round to nearest even


@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_delayed_scaling_follows_transformer_engine(algo, gen):
    dtype, fp8_max, margin, n = torch.float8_e4m3fn, 448.0, 1, 3
    m = DelayedScalingCast(dtype, margin=margin, amax_history_len=n, amax_compute_algo=algo)
    history, scale = [], 1.0
    for step in range(6):
        x = torch.randn(257, generator=gen) * float(2.0 ** (step % 4 * 3 - 4))
        y, used = m(x)
        assert float(used) == pytest.approx(scale, rel=1e-6)
        assert torch.equal(y.view(torch.uint8), _cast(x, float(used), dtype, fp8_max).view(torch.uint8))
        history = [float(x.abs().max())] + history[: n - 1]
        window = max(history) if algo == "max" else history[0]
        scale = _te_scale(window, fp8_max, margin, scale)
        assert float(m.scale) == pytest.approx(scale, rel=1e-6)
        assert m.amax_history.tolist()[: len(history)] == pytest.approx(history, rel=0)
    m.eval()  # frozen: the same scale and history however many calls
    frozen = (m.scale.clone(), m.amax_history.clone())
    y, used = m(torch.randn(40, generator=gen) * 1e3)
    assert torch.equal(used, frozen[0]) and torch.equal(m.amax_history, frozen[1])


def test_delayed_scaling_buffers_state_dict_and_compile(gen):
    m = DelayedScalingCast(torch.float8_e5m2, amax_history_len=4)
    xs = [torch.randn(64, generator=gen) * s for s in (1.0, 30.0, 0.01)]
    for x in xs:
        m(x)
    assert set(m.state_dict()) == {"amax_history", "scale"}
    twin = DelayedScalingCast(torch.float8_e5m2, amax_history_len=4)
    twin.load_state_dict(m.state_dict())
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(64, generator=gen) * 5
    y_eager, s_eager = m(x)
    y_comp, s_comp = compiled(x)
    assert torch.equal(s_comp, s_eager) and torch.equal(y_comp.view(torch.uint8), y_eager.view(torch.uint8))
    torch.testing.assert_close(twin.amax_history, m.amax_history, rtol=0, atol=0)  # rolled inside the graph too
    with pytest.raises(InvalidInput, match=r"DelayedScalingCast: argument 'amax_compute_algo': expected 'max' or "
                                           r"'most_recent', got 'mean'"):
        DelayedScalingCast(torch.float8_e4m3fn, amax_compute_algo="mean")


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_knn_index_against_faiss(metric, gen):
    faiss = pytest.importorskip("faiss")
    index = KNNIndex(12, metric=metric)
    parts = [torch.randn(n, 12, generator=gen) for n in (150, 90)]
    for p in parts:
        index.add(p)
    assert index.ntotal == 240
    queries = torch.randn(9, 12, generator=gen)
    got = index.search(queries, 6)
    peer = faiss.IndexFlatL2(12) if metric == "l2" else faiss.IndexFlatIP(12)
    peer.add(torch.cat(parts).numpy())
    dist, idx = peer.search(queries.numpy(), 6)
    assert torch.equal(got.indices, torch.from_numpy(idx))
    torch.testing.assert_close(got.distances, torch.from_numpy(dist), rtol=1e-4, atol=1e-4)

    clone = KNNIndex(12, metric=metric)  # an empty index loads any number of rows
    clone.load_state_dict(index.state_dict())
    again = clone.search(queries, 6)
    assert torch.equal(again.indices, got.indices) and torch.equal(again.distances, got.distances)
    compiled = torch.compile(clone.search, fullgraph=True, backend="eager")
    assert torch.equal(compiled(queries, 6).indices, got.indices)
    wide = clone.to(torch.float64)
    assert wide.database.dtype == torch.float64 and torch.equal(wide.search(queries, 6).indices, got.indices)
    clone.reset()
    assert clone.ntotal == 0
    with pytest.raises(InvalidInput, match=r"KNNIndex.search: .*empty index"):
        clone.search(queries, 1)
    with pytest.raises(InvalidInput, match=r"KNNIndex.add: argument 'x': expected a tensor \[n, 12\], got shape \(3, 5\)"):
        clone.add(torch.randn(3, 5))
