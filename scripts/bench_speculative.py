"""Speculative decoding against the target's plain greedy generate and transformers' own assisted
generation (generate(assistant_model=draft)), side by side in one process, runs alternated.

Models (random weights, nothing downloaded): the target is a Llama of TARGET_LAYERS layers whose layers
after the first are brought near identity (their output projections scaled by --residual-scale); the
draft is the target cut to its first layer, sharing its embedding, first layer, final norm and head.
So the draft is several times cheaper and agrees with the target often, as a trained draft would;
--residual-scale sets how often (larger: less agreement).

Reported per method: committed tokens per target forward pass (the acceptance per step plus the token
the target adds; 1.0 for plain generate), and the median wall time per generated token.

    python scripts/bench_speculative.py [--new-tokens 64] [--repeats 5] [--residual-scale 0.05] [--hidden 512]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

TARGET_LAYERS = 8


def build(residual_scale: float, vocab: int, hidden: int, impl: str):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                                   num_hidden_layers=TARGET_LAYERS, num_attention_heads=hidden // 32,
                                   num_key_value_heads=max(1, hidden // 64), max_position_embeddings=1024,
                                   eos_token_id=None, pad_token_id=0)
    target = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
    with torch.no_grad():
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(residual_scale)
            layer.mlp.down_proj.weight.mul_(residual_scale)
    draft = copy.deepcopy(target)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    return target, draft


class ForwardCount:
    """Counts a model's forward passes (a pre-hook)."""

    def __init__(self, model) -> None:
        self.n = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.n += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--num-draft", type=int, default=4)
    ap.add_argument("--residual-scale", type=float, default=0.05)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from core.integrations import speculative
    from core.integrations import transformers as sy
    from core.ops.decode_step import medusa_tree

    sy.register()
    target, draft = build(args.residual_scale, args.vocab, args.hidden, "sdpa")
    sy_target, sy_draft = copy.deepcopy(target), copy.deepcopy(draft)
    sy_target.set_attn_implementation("switchyard")
    sy_draft.set_attn_implementation("switchyard")
    counts = {id(m): ForwardCount(m) for m in (target, sy_target)}
    gen = torch.Generator().manual_seed(1)
    N = args.new_tokens
    tree = medusa_tree(16, 4)

    def plain(ids):
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False)
        return out, target

    def assisted(ids):
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                              assistant_model=draft)
        return out, target

    def ours_chain(ids):
        return speculative.generate(target, draft, ids, max_new_tokens=N, num_draft=args.num_draft).sequences, target

    def ours_tree(ids):
        return speculative.generate(target, draft, ids, max_new_tokens=N, parents=tree).sequences, target

    def ours_chain_sy(ids):
        return speculative.generate(sy_target, sy_draft, ids, max_new_tokens=N,
                                    num_draft=args.num_draft).sequences, sy_target

    methods = {
        "target generate (greedy)": plain,
        "transformers assisted (assistant_model=)": assisted,
        f"switchyard chain k={args.num_draft}": ours_chain,
        "switchyard Medusa tree (16 nodes)": ours_tree,
        f"switchyard chain k={args.num_draft}, switchyard attention": ours_chain_sy,
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    per_forward: dict[str, list[float]] = {m: [] for m in methods}
    mismatches: dict[str, int] = {m: 0 for m in methods}
    ids = torch.randint(1, args.vocab, (1, args.prompt), generator=gen)
    for fn in methods.values():  # warm-up: the dispatcher tunes its keys here, outside the timings
        fn(ids)
    for _ in range(args.repeats):
        ids = torch.randint(1, args.vocab, (1, args.prompt), generator=gen)
        want = None
        for name, fn in methods.items():
            counter = counts[id(target if fn is not ours_chain_sy else sy_target)]
            before = counter.n
            start = time.perf_counter()
            out, _ = fn(ids)
            elapsed = time.perf_counter() - start
            new = out.shape[1] - ids.shape[1]
            times[name].append(elapsed / new)
            per_forward[name].append(new / (counter.n - before))
            want = out if want is None else want
            mismatches[name] += int(not torch.equal(out, want))
    base = statistics.median(times["target generate (greedy)"])
    print(f"target {TARGET_LAYERS} layers, draft 1 layer (shared embedding/head), hidden {args.hidden}, "
          f"vocab {args.vocab}, residual scale {args.residual_scale}, prompt {args.prompt}, {N} new tokens, "
          f"{args.repeats} runs, {args.threads} thread(s); load {os.getloadavg()[0]:.2f}")
    print(f"{'method':48s} {'tokens/target fwd':>18s} {'ms/token':>9s} {'vs plain':>9s} {'!= greedy':>9s}")
    for name in methods:
        t = statistics.median(times[name])
        print(f"{name:48s} {statistics.mean(per_forward[name]):18.2f} {t * 1e3:9.2f} {base / t:8.2f}x "
              f"{mismatches[name]:9d}")


if __name__ == "__main__":
    main()
