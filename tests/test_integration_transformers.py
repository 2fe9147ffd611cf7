"""transformers models served by the dispatcher: tiny random-weight Llama (GQA), Mistral (a sliding
window that matters) and Qwen2 (MQA) built from configs, nothing downloaded.

Each is run under "sdpa" (the peer), "switchyard", and "sdpa" in float64 (the higher-precision
reference): at every real (non-padding) token our logits must be as close to the float64 ones as
float32 SDPA's are (2x plus a floor, the attention op's own compare rule) and within float32 rounding
of SDPA's; greedy generate, with its one-token decode steps against the KV cache, gives the same tokens.
"""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from core import dispatcher  # noqa: E402
from core.errors import Unsupported  # noqa: E402
from core.integrations import transformers as sy  # noqa: E402
from core.integrations.speculative import _cache_kwarg  # noqa: E402

VOCAB = 96
EPS32 = float(torch.finfo(torch.float32).eps)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: per-op overhead; two threads on two shared cores only contend
    warnings.filterwarnings("ignore", category=FutureWarning)
    assert sy.register() == "switchyard"
    yield
    torch.set_num_threads(threads)


def _config(name: str, **kw):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, eos_token_id=None)
    common.update(kw)
    if name == "llama":  # GQA: 2 query heads per key/value head
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if name == "mistral":  # a window of 4 over prompts of 11 and more
        return transformers.MistralConfig(**{"num_key_value_heads": 2, "sliding_window": 4, **common})
    return transformers.Qwen2Config(num_key_value_heads=1, **common)  # MQA


MODELS = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    torch.manual_seed(MODELS.index(request.param) + 100)
    cfg = _config(request.param)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="switchyard").eval()
    m.name = request.param
    return m


class _Counter:
    """Counts dispatcher.attention calls and refuses torch's SDPA while counting."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = dispatcher.attention

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        def refuse(*args, **kwargs):
            raise AssertionError("torch's scaled_dot_product_attention was called under attn_implementation='switchyard'")

        monkeypatch.setattr(dispatcher, "attention", counted)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)


def _batch(gen: torch.Generator, padding: str, B: int = 3, L: int = 11):
    ids = torch.randint(1, VOCAB, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.int64)
    if padding == "left":
        mask[1, :4] = 0
        mask[2, :1] = 0
    elif padding == "right":
        mask[1, -3:] = 0
        mask[2, -6:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _logits(m, impl: str, ids, mask, dtype=torch.float32):
    m.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return m.to(dtype)(ids, attention_mask=mask).logits.double()
    finally:
        m.to(torch.float32).set_attn_implementation("switchyard")


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_sdpa_at_real_tokens(model, padding, gen, monkeypatch, capsys):
    ids, mask = _batch(gen, padding)
    ref = _logits(model, "sdpa", ids, mask, torch.float64)
    peer = _logits(model, "sdpa", ids, mask)
    counter = _Counter(monkeypatch)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits.double()
    assert counter.calls == model.config.num_hidden_layers
    real = mask.bool()
    scale = float(ref[real].abs().max())
    err, peer_err = float((ours - ref)[real].abs().max()), float((peer - ref)[real].abs().max())
    vs_peer = float((ours - peer)[real].abs().max())
    with capsys.disabled():
        print(f"\n  {model.name} {padding}: max |switchyard - sdpa| {vs_peer:.3g}, vs float64 {err:.3g} (sdpa's {peer_err:.3g})")
    assert err <= 2 * peer_err + 8 * EPS32 * scale, (err, peer_err)
    assert vs_peer <= 16 * EPS32 * scale, vs_peer


def test_the_sliding_window_is_applied(gen):
    """Mistral's window reaches the attention through the mask: without it the logits differ, with it
    ours equal the peer's (checked above), so the window is not lost on the way."""
    torch.manual_seed(5)
    windowed = transformers.AutoModelForCausalLM.from_config(_config("mistral"), attn_implementation="switchyard").eval()
    unwindowed = transformers.AutoModelForCausalLM.from_config(_config("mistral", sliding_window=None),
                                                               attn_implementation="switchyard").eval()
    unwindowed.load_state_dict(windowed.state_dict())
    ids, mask = _batch(gen, "left")
    with torch.no_grad():
        a = windowed(ids, attention_mask=mask).logits
        b = unwindowed(ids, attention_mask=mask).logits
        peer = _logits(windowed, "sdpa", ids, mask)
    assert float((a - b)[:, 5:].abs().max()) > 1e-3
    assert float((a.double() - peer)[mask.bool()].abs().max()) <= 16 * EPS32 * float(peer.abs().max())


@pytest.mark.parametrize("padding", ["none", "left"])
def test_greedy_generate_gives_the_same_tokens(model, padding, gen, monkeypatch):
    ids, mask = _batch(gen, padding, L=7)
    model.set_attn_implementation("sdpa")
    try:
        want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    finally:
        model.set_attn_implementation("switchyard")
    counter = _Counter(monkeypatch)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert counter.calls == 12 * model.config.num_hidden_layers  # the prefill and 11 one-token steps
    assert torch.equal(got, want)


def test_one_token_decode_steps_against_the_kv_cache(model, gen):
    """Prefill, then one token at a time through a DynamicCache: every step's logits match sdpa's."""
    ids, mask = _batch(gen, "left", L=6)
    steps = torch.randint(1, VOCAB, (ids.shape[0], 6), generator=gen)
    outs = {}
    for impl in ("sdpa", "switchyard"):
        model.set_attn_implementation(impl)
        cache = transformers.DynamicCache()
        m = mask
        rows = []
        with torch.no_grad():
            out = model(ids, attention_mask=m, use_cache=True, **{_cache_kwarg(type(model)): cache})
            rows.append(out.logits[:, -1])
            for j in range(steps.shape[1]):
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                out = model(steps[:, j:j + 1], attention_mask=m, use_cache=True, **{_cache_kwarg(type(model)): cache})
                rows.append(out.logits[:, -1])
        outs[impl] = torch.stack(rows, 1)
    model.set_attn_implementation("switchyard")
    scale = float(outs["sdpa"].abs().max())
    assert float((outs["switchyard"] - outs["sdpa"]).abs().max()) <= 16 * EPS32 * scale


def test_register_is_idempotent_and_every_entry_point_takes_the_name():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert sy.register() == sy.register() == "switchyard"
    assert AttentionInterface()["switchyard"] is sy.attention_forward
    assert "switchyard" in AttentionMaskInterface()
    cfg = _config("llama")
    assert transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="switchyard").config._attn_implementation == "switchyard"
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    m.set_attn_implementation("switchyard")
    assert m.config._attn_implementation == "switchyard"


def test_training_gradients_match_sdpa(gen):
    torch.manual_seed(9)
    m = transformers.AutoModelForCausalLM.from_config(_config("llama"), attn_implementation="switchyard").train()
    ids, mask = _batch(gen, "right")
    grads = {}
    for impl in ("sdpa", "switchyard"):
        m.set_attn_implementation(impl)
        m.zero_grad()
        m(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    for name, g in grads["sdpa"].items():
        assert float((grads["switchyard"][name] - g).abs().max()) <= 1e-4 * max(1.0, float(g.abs().max())), name


def test_dropout_in_training_is_refused_naming_the_layer(gen):
    m = transformers.AutoModelForCausalLM.from_config(_config("llama", attention_dropout=0.1),
                                                      attn_implementation="switchyard").train()
    ids, mask = _batch(gen, "none")
    with pytest.raises(Unsupported, match=r"switchyard attention in LlamaAttention \(layer_idx=0\): attention dropout 0.1"):
        m(ids, attention_mask=mask)
    m.eval()  # no dropout at inference: served
    with torch.no_grad():
        assert torch.isfinite(m(ids, attention_mask=mask).logits).all()


def test_a_custom_4d_mask(model, gen):
    """A caller's own 4-D mask: bool, or additive float of 0 and -inf, is served like SDPA serves it;
    a float mask carrying a bias is refused (the op's mask is bool)."""
    ids, _ = _batch(gen, "none", L=8)
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()
    allowed[5, 2] = False
    bool_mask = allowed.expand(ids.shape[0], 1, 8, 8)
    float_mask = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    peer = _logits(model, "sdpa", ids, bool_mask)
    with torch.no_grad():
        for m4 in (bool_mask, float_mask):
            ours = model(ids, attention_mask=m4).logits.double()
            assert float((ours - peer).abs().max()) <= 16 * EPS32 * float(peer.abs().max())
        with pytest.raises(Unsupported, match=r"additive float attention_mask with values other than 0 and -inf"):
            model(ids, attention_mask=float_mask + 0.5)


def test_under_torch_compile(gen):
    torch.manual_seed(13)
    m = transformers.AutoModelForCausalLM.from_config(_config("llama", num_hidden_layers=1),
                                                      attn_implementation="switchyard").eval()
    ids, mask = _batch(gen, "left")
    peer = _logits(m, "sdpa", ids, mask)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        ours = compiled(ids, attention_mask=mask).logits.double()
    real = mask.bool()
    assert float((ours - peer)[real].abs().max()) <= 16 * EPS32 * float(peer[real].abs().max())
