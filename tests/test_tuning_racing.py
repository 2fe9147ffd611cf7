"""core.racing on simulated timings: drops, stops, ties, the default's protection, confidence,
contention, lockstep combining, and neighbour predictions. Each candidate's runs are drawn from a
seeded log-normal around its true time, on a simulated clock, so every test knows the truth."""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from core import racing


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def entrants(truth: dict[str, float], priority: dict[str, int], sigma: float, seed: int, clock: Clock,
             first: dict[str, float] | None = None, shared: float = 0.0) -> list[racing.Entrant]:
    """Candidates whose run i takes truth * lognormal(sigma) (plus a load factor shared by the round's
    runs when ``shared``): the first run is ``first[name]`` when given."""
    rng = random.Random(seed)
    load = {"round": -1, "f": 1.0}
    count = {n: 0 for n in truth}

    def make(name: str) -> racing.Entrant:
        def run() -> float:
            if count[name] == 0 and first and name in first:
                t = first[name]
            else:
                t = truth[name] * math.exp(rng.gauss(0, sigma)) * (load["f"] if shared else 1.0)
            count[name] += 1
            if shared and rng.random() < 0.3:  # the load drifts: every later run in this stretch pays it
                load["f"] = math.exp(rng.gauss(0, shared))
            clock.t += t
            return t
        return racing.Entrant(name=name, priority=priority[name], run=run)
    return [make(n) for n in truth]


def race(truth, priority, sigma=0.02, seed=0, budget=10.0, **kw):
    clock = Clock()
    es = entrants(truth, priority, sigma, seed, clock, **{k: v for k, v in kw.items() if k in ("first", "shared")})
    default = min(es, key=lambda e: (-e.priority, e.name))
    out = racing.race(es, default, budget_s=budget, long_run_s=kw.get("long_run_s", 100.0), clock=clock,
                      combine=kw.get("combine"))
    return out, {e.name: e for e in es}, clock.t


def test_a_clearly_faster_candidate_wins_confidently_and_the_slow_ones_leave_early():
    truth = {"a": 1e-3, "b": 2e-3, "c": 1.3e-3}
    out, es, spent = race(truth, {"a": 1, "b": 5, "c": 3}, sigma=0.05)
    assert out.pick == "a" and out.confidence >= 0.95 and not out.contended
    assert out.stop in ("alone", "confident")
    assert "confidently slower" in es["c"].out and not es["b"].out  # b is the default: it races to the end
    assert out.rounds < 20 and spent < 0.1  # far below the 10 s budget


def test_near_ties_go_to_priority_then_name_in_every_run():
    truth = {"fast": 1.00e-3, "prio": 1.01e-3, "other": 1.015e-3}  # all within 3%
    picks = set()
    for seed in range(10):
        out, _, _ = race(truth, {"fast": 1, "prio": 9, "other": 5}, sigma=0.01, seed=seed)
        picks.add(out.pick)
        assert out.confidence >= 0.95 and out.stop in ("tie", "confident")
    assert picks == {"prio"}
    out, _, _ = race({"b": 1e-3, "a": 1e-3}, {"a": 2, "b": 2}, sigma=0.01)
    assert out.pick == "a"  # same priority: by name


def test_the_default_stays_unless_another_is_confidently_faster():
    # 10% faster, but noise far beyond it and a tiny budget: the default keeps the call, at low confidence
    truth = {"default": 1.1e-3, "challenger": 1.0e-3}
    out, es, _ = race(truth, {"default": 9, "challenger": 1}, sigma=0.8, budget=0.005, first=truth)
    assert out.pick == "default" and out.confidence < 0.95 and out.contended
    assert not es["default"].out
    # with a real budget and quiet timings the challenger wins at the stated confidence
    out, _, _ = race(truth, {"default": 9, "challenger": 1}, sigma=0.02)
    assert out.pick == "challenger" and out.confidence >= 0.95


def test_a_candidate_3x_slower_leaves_after_a_second_look():
    truth = {"a": 1e-3, "slow": 5e-3}
    out, es, _ = race(truth, {"a": 2, "slow": 1})
    assert out.pick == "a" and len(es["slow"].times) == 2 and "over 3x the best run" in es["slow"].out
    out, es, _ = race({"a": 1e-3, "hopeless": 50e-3}, {"a": 2, "hopeless": 1})
    assert len(es["hopeless"].times) == 1  # 30x: no second look


def test_one_slow_first_run_from_a_burst_of_load_does_not_cost_a_candidate_the_race():
    truth = {"a": 1.2e-3, "fast": 1e-3}
    out, es, _ = race(truth, {"a": 2, "fast": 1}, first={"fast": 6e-3})
    assert out.pick == "fast" and not es["fast"].out


def test_a_long_first_run_is_not_repeated():
    truth = {"a": 2.0, "b": 0.9}
    out, es, _ = race(truth, {"a": 2, "b": 1}, long_run_s=1.0)
    assert len(es["a"].times) == 1 and out.pick == "b"


def test_a_failing_candidate_is_marked_and_the_race_goes_on():
    clock = Clock()
    es = entrants({"a": 1e-3, "b": 1.5e-3}, {"a": 1, "b": 2}, 0.02, 0, clock)
    es[1].run = lambda: math.inf
    out = racing.race(es, es[1], budget_s=1.0, long_run_s=10.0, clock=clock)
    assert out.pick == "a" and es[1].failed and not es[1].times


@pytest.mark.parametrize("seed", range(3))
def test_drift_shared_by_a_round_cancels_in_the_paired_ratios(seed):
    # the load jumps up to ~2x between stretches of runs; the 15% difference still shows
    truth = {"a": 1.0e-3, "b": 1.15e-3}
    out, _, _ = race(truth, {"a": 1, "b": 2}, sigma=0.01, seed=seed, shared=0.4)
    assert out.pick == "a"


def test_calibration_on_simulated_races():
    """Of the races stated at confidence >= 0.95, at least 95% picked a kernel within 3% of the fastest."""
    rng = random.Random(5)
    stated, right = 0, 0
    for seed in range(120):
        truth = {f"k{i}": 1e-3 * math.exp(rng.uniform(-0.15, 0.15)) for i in range(3)}
        out, _, _ = race(truth, {"k0": 3, "k1": 2, "k2": 1}, sigma=rng.choice([0.01, 0.05, 0.2]), seed=seed, budget=0.03)
        if out.confidence >= 0.95:
            stated += 1
            right += truth[out.pick] <= min(truth.values()) * 1.03
    assert stated >= 60 and right >= 0.95 * stated


def test_combine_sees_every_round_with_the_elapsed_time():
    seen = []

    def combine(xs):
        seen.append(list(xs))
        return [x * 1.0 for x in xs]

    out, es, _ = race({"a": 1e-3, "b": 2e-3}, {"a": 1, "b": 2}, combine=combine)
    assert out.pick == "a"
    assert all(len(s) == len([e for e in es.values() if e.times]) + 1 or len(s) >= 2 for s in seen)
    assert seen[0][-1] >= 0.0  # the elapsed time travels with the round


def test_prediction_from_neighbours_in_size_only():
    spec = SimpleNamespace(key_sizes=(1, 2))
    known = {
        ("cpu", 64, 128, "x"): {"winner": "fused", "rows": [{"backend": "fused", "median_ms": 1.0},
                                                            {"backend": "torch", "median_ms": 1.2},
                                                            {"backend": "slow", "median_ms": 5.0}]},
        ("cpu", 256, 128, "x"): {"winner": "fused", "rows": []},
        ("cpu", 128, 128, "y"): {"winner": "torch", "rows": []},  # another non-size part: not a neighbour
    }
    guess = racing.predict(spec, ("cpu", 128, 128, "x"), known)
    assert guess.winner == "fused" and guess.shortlist == ("fused", "torch") and guess.neighbours == 2
    assert racing.predict(spec, ("cpu", 128, 128, "z"), known) is None
    assert racing.predict(spec, ("cpu", 4096, 4096, "x"), known) is None  # too far
    assert racing.predict(SimpleNamespace(key_sizes=()), ("cpu", 128, 128, "x"), known) is None


def test_a_default_3x_slower_in_every_round_loses_within_two_rounds():
    truth = {"default": 40e-3, "kdtree": 10e-3}
    out, es, _ = race(truth, {"default": 9, "kdtree": 1}, sigma=0.3, budget=0.1)
    assert out.pick == "kdtree" and out.confidence >= 0.95 and len(es["default"].times) <= 3


def test_a_microsecond_candidate_is_timed_in_bursts_and_a_long_one_alone():
    import time

    import torch

    from core import tuning
    from core.ops.precision_cast import SPEC
    from core.spec import Sample
    from registry import Kernel

    calls = {"short": 0, "long": 0}

    def short(x, **attrs):
        calls["short"] += 1

    def long(x, **attrs):
        calls["long"] += 1
        end = time.perf_counter() + 5e-4
        while time.perf_counter() < end:
            pass

    sample = Sample(args=(torch.randn(8),), attrs={"dtype": torch.float16, "rounding": "nearest", "scaling": "none",
                                                  "saturate": False, "margin": 0, "seed": None})
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for name, fn in (("short", short), ("long", long)):
        variant = Kernel(op="precision_cast", backend=name, fn=fn).variants()[0]
        runs[name] = tuning._runner(variant, sample, False, SPEC, gen, {}, burst=True)
    for name in runs:
        times = [runs[name]() for _ in range(4)]
        assert all(t > 0 for t in times)
    assert calls["long"] == 4  # a run of 0.5 ms is its own measure
    assert calls["short"] > 4 + 2 * 8  # later runs are bursts of back-to-back calls
    assert calls["short"] <= 1 + 3 * tuning.MAX_BURST
    lockstep = tuning._runner(Kernel(op="precision_cast", backend="s", fn=short).variants()[0], sample, False, SPEC,
                              gen, {}, burst=False)
    before = calls["short"]
    for _ in range(3):
        lockstep()
    assert calls["short"] - before == 3  # without bursts (lockstep), one call a run


def test_a_default_whose_one_run_spends_the_budget_gets_a_second_look_against_a_3x_faster_one():
    # nearest_neighbor M=10000 N=1e6 D=3: the brute force (the default by name) took 0.97 s, under the
    # long-run mark, and spent the 0.3 s budget in round 0; on that one look the default kept the call
    # against a kd-tree 10x faster, and served it at 10x the time
    truth = {"brute": 0.8, "kdtree": 0.08}
    out, es, _ = race(truth, {"brute": 30, "kdtree": 30}, sigma=0.05, budget=0.3, long_run_s=1.0)
    assert out.pick == "kdtree" and out.confidence >= 0.95
    assert len(es["brute"].times) == 2  # one more look, no more


def test_a_challenger_ahead_in_every_round_stretches_the_budget_to_min_rounds():
    # bfloat16 prefill B=16 Hq=32 Hkv=16 L=547 D=48 on the Xeon: five candidates of 70-320 ms spent the
    # 0.5 s budget in one round, and the default (fused, 169 ms) kept the call against 70 ms
    truth = {"fused": 0.169, "fused-sdpa": 0.078, "gemm": 0.10, "torch-sdpa": 0.070, "torch": 0.32}
    prio = {"fused": 30, "fused-sdpa": 25, "gemm": 22, "torch-sdpa": 20, "torch": 10}
    out, es, spent = race(truth, prio, sigma=0.05, budget=0.5, long_run_s=1.0)
    assert out.pick == "torch-sdpa"  # at 0.93: fused-sdpa, 11% behind, is not yet confidently over 3%
    assert out.rounds == racing.MIN_ROUNDS and spent <= racing.EXTEND * 0.5 + 0.75  # the cap, plus the last round
    # 1.67x faster, a 0.3 s budget: the second look's 3x is not needed any more
    out, es, _ = race({"brute": 0.5, "kdtree": 0.3}, {"brute": 30, "kdtree": 30}, sigma=0.05, budget=0.3,
                      long_run_s=1.0)
    assert out.pick == "kdtree" and len(es["brute"].times) == 2  # the cap, 1.2 s, ended it after two rounds


def test_the_stretch_is_capped_and_needs_a_lead_in_every_round():
    # behind in one round (noise far beyond the gap): the budget ends the race after one round
    truth = {"default": 0.2, "challenger": 0.19}
    out, es, _ = race(truth, {"default": 9, "challenger": 1}, sigma=0.01, budget=0.3, long_run_s=1.0,
                      first={"challenger": 0.25})
    assert out.pick == "default" and len(es["default"].times) == 1
    # ahead in every round, but each round far beyond the budget: it stops at EXTEND times the budget
    out, es, spent = race({"default": 2.0, "challenger": 1.5}, {"default": 9, "challenger": 1}, sigma=0.01,
                          budget=1.0, long_run_s=100.0)
    assert len(es["default"].times) == 2 and spent < racing.EXTEND * 1.0 + 3.5
    # a third-party kernel's one long run (frozen: its own measure) spends the budget, not the stretch:
    # B=8 Hq=32 Hkv=4 L=560 D=96 float32 on the Xeon kept fused at 163 ms beside fused-sdpa's 134 ms
    truth = {"fused": 0.163, "fused-sdpa": 0.134, "torch-sdpa": 0.139, "torch": 0.308, "acme": 1.32}
    prio = {"fused": 30, "fused-sdpa": 25, "torch-sdpa": 20, "torch": 10, "acme": 5}
    out, es, spent = race(truth, prio, sigma=0.02, budget=0.5, long_run_s=1.0)
    assert es["acme"].frozen and len(es["acme"].times) == 1
    assert out.pick == "fused-sdpa" and out.rounds == racing.MIN_ROUNDS


def scripted(plan: dict[str, tuple[float, dict[int, float]]], priority: dict[str, int], clock: Clock,
             sigma: float = 0.02, seed: int = 0) -> list[racing.Entrant]:
    """Candidates whose i-th run takes ``slow[i]`` when given, else truth * lognormal(sigma)."""
    rng = random.Random(seed)
    count = {n: 0 for n in plan}

    def make(name: str) -> racing.Entrant:
        truth, slow = plan[name]

        def run() -> float:
            i = count[name]
            count[name] += 1
            t = slow.get(i, truth * math.exp(rng.gauss(0, sigma)))
            clock.t += t
            return t
        return racing.Entrant(name=name, priority=priority[name], run=run)
    return [make(n) for n in plan]


def test_a_candidate_dropped_in_a_burst_that_slowed_the_others_too_is_raced_again_and_wins():
    # seen on the Xeon: prefill B=2 Hq=8 Hkv=2 L=128 D=64 causal bfloat16, fused-bf16gemm timed 5.8 ms
    # twice (0.13 ms steady) while fused ran 2x its steady 0.2 ms; the hopeless rule dropped the fastest
    clock = Clock()
    es = scripted({"fused": (0.2e-3, {0: 0.4e-3, 1: 0.42e-3}), "gemm": (0.13e-3, {0: 5.8e-3, 1: 5.9e-3}),
                   "torch": (0.3e-3, {})}, {"fused": 9, "gemm": 5, "torch": 1}, clock)
    by = {e.name: e for e in es}
    out = racing.race(es, by["fused"], budget_s=0.3, long_run_s=1.0, clock=clock)  # the lazy budget
    assert out.pick == "gemm" and by["gemm"].reprieved and not by["gemm"].out
    assert min(by["gemm"].times) >= 2  # its burst runs are forgotten


def test_a_hopeless_candidate_given_a_second_chance_leaves_again_after_two_runs():
    clock = Clock()
    es = scripted({"a": (1e-3, {1: 2.5e-3}), "slow": (5e-3, {})}, {"a": 2, "slow": 1}, clock)
    by = {e.name: e for e in es}
    out = racing.race(es, by["a"], budget_s=10.0, long_run_s=100.0, clock=clock)
    assert out.pick == "a" and by["slow"].reprieved and by["slow"].out.startswith("left")
    assert len(by["slow"].times) == 2  # two runs after the reprieve, the first two forgotten
    # with noisy runs the t test cannot settle two rounds: the 3x rule does
    clock = Clock()
    es = scripted({"a": (1e-3, {1: 2.5e-3}), "slow": (5e-3, {})}, {"a": 2, "slow": 1}, clock, sigma=0.3, seed=3)
    by = {e.name: e for e in es}
    out = racing.race(es, by["a"], budget_s=10.0, long_run_s=100.0, clock=clock)
    assert out.pick == "a" and by["slow"].reprieved and "second chance" in by["slow"].out
    assert len(by["slow"].times) == 2
    # in a quiet race (round 1 within 1.5x of each survivor's fastest) the drop stands after two runs
    clock = Clock()
    es = scripted({"a": (1e-3, {}), "slow": (5e-3, {})}, {"a": 2, "slow": 1}, clock)
    by = {e.name: e for e in es}
    out = racing.race(es, by["a"], budget_s=10.0, long_run_s=100.0, clock=clock)
    assert out.pick == "a" and not by["slow"].reprieved and len(by["slow"].times) == 2
