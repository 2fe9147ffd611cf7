"""The statistics of a tuning decision: interleaved paired rounds, racing, confidence, neighbours.

Candidates are timed in rounds, one run each per round, in a fresh order every round (a seeded
shuffle, the same on every rank), so load drift hits all of them alike and no candidate always
follows the same one: a rotation keeps each one's predecessor fixed, and the after-effects of a slow
predecessor (a cache it emptied, an OpenMP team that fell asleep during its 5 ms of numpy: the next
parallel kernel then took 4x its time) would always fall on the same candidate. They are compared
by paired log-ratios within rounds. After each
round a candidate confidently slower than the leader leaves (a one-sided t bound on its mean paired
log-ratio, at a strict level because the test is repeated). The race stops when one candidate is
left, when the pick is confidently within epsilon of every other candidate left, or at the budget
(which a challenger that beat the default by over epsilon in every round stretches to MIN_ROUNDS rounds,
within EXTEND times the budget: fewer rounds could only keep the default).
A candidate over 3x the best run in both of its first two rounds leaves then (the hopeless rule),
unless that second round was contended for the others too: then it is raced once more, from scratch.

The pick is never worse than the default (the highest-priority candidate): another candidate wins
only when it is confidently faster than the default. Candidates whose estimates are within epsilon
of the fastest are a tie, broken by priority, then name, so repeated runs agree wherever the
difference is below noise. The decision's confidence is the posterior probability (Student t over
each pair's log-ratios, multiplied across pairs) that the pick is within epsilon of the fastest.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

EPSILON = 0.03
ORDER_SEED = 20261203  # the rounds' shuffles: fixed, so every rank of a lockstep race runs the same order
LEVEL = 0.995  # one-sided level of drops and stops (the test is repeated each round: stricter than 0.95)
STATED = 0.95  # the confidence a decision is stated final at
CONTENTION = 3.0  # a paired ratio's scatter this many times epsilon, at low confidence: contended
MIN_ROUNDS = 3
TRIM = 0.2  # of the paired log-ratios, each side
CLEAN = 1.5  # a run this many times its candidate's fastest is taken as slowed by load from elsewhere
MAX_ROUNDS = 200
HOPELESS = 3.0
LONG_HOPELESS = 30.0  # a first run this many times the best is not given a second look
LONG_RUN = 10.0
EXTEND = 4.0  # a race a challenger leads on every run may run on to this many times its budget (_unsettled)


def t_cdf(t: float, df: int) -> float:
    """Student t distribution function, exact for integer ``df`` (Abramowitz and Stegun 26.7.3-4)."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, sin = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = (2 / math.pi) * (theta + (sin * math.cos(theta) * total if df > 1 else 0.0))
    else:
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = sin * total
    return 0.5 + a / 2 if t >= 0 else 0.5 - a / 2


@dataclass(slots=True)
class Pair:
    """Paired log-ratios log(t_a / t_b) over the rounds both ran."""

    mean: float
    se: float
    n: int
    df: int = 0

    def cdf(self, x: float) -> float:
        """Posterior P(true log-ratio <= x): Student t around the (trimmed) mean (flat prior)."""
        if self.n < 2 or math.isinf(self.se):
            return 0.5
        if self.se <= 0:
            return 1.0 if self.mean <= x else 0.0
        return t_cdf((x - self.mean) / self.se, max(1, self.df or self.n - 1))


@dataclass(slots=True, kw_only=True)
class Entrant:
    name: str
    priority: int
    run: Callable[[], float]  # one timed run, seconds; inf when it raised (the caller keeps the error)
    times: dict[int, float] = field(default_factory=dict)  # round -> seconds
    out: str = ""  # why it left the race ("" while in it)
    failed: bool = False  # it raised while timed (on some rank)
    frozen: bool = False  # a long first run, or hopeless after one: not repeated
    hopeless: bool = False  # left by the hopeless rule after two runs
    reprieved: bool = False  # brought back once: those two runs fell in a round that slowed the others too

    def floor(self) -> float:
        return min(self.times.values()) if self.times else math.inf

    def clean(self) -> list[float]:
        """Its runs not slowed by contention (within CLEAN of its fastest), round 0 aside when others exist."""
        runs = [t for r, t in self.times.items() if r > 0 or len(self.times) <= 3]
        f = min(runs, default=math.inf)
        return sorted(t for t in runs if t <= CLEAN * f)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    pick: str | None
    confidence: float
    rounds: int
    stop: str  # "alone", "confident", "tie", "budget", "none"
    noise: float  # median std of one paired log-ratio between the pick and the others
    gap: float  # the smallest |mean log-ratio| between the pick and another candidate
    contended: bool


def pair(a: Entrant, b: Entrant) -> Pair:
    if a.frozen or b.frozen:  # one side has a single run: its medians, taken as exact (a 3x or 10x gap)
        ma, mb = median_ms(a), median_ms(b)
        return Pair(mean=math.log(ma / mb), se=0.0, n=2) if ma and mb else Pair(mean=0.0, se=math.inf, n=0)
    common = [r for r in a.times if r in b.times and a.times[r] > 0 and b.times[r] > 0]
    if len(common) > 3:
        common = [r for r in common if r > 0]  # round 0 carries warm-up: left out once there are enough others
    # Load from elsewhere only ever adds time (a descheduled thread makes a 1 ms kernel take 30 ms):
    # a run over CLEAN times the candidate's fastest is contended, and a round either one was is left
    # out, while at least 2 clean rounds remain.
    clean = [r for r in common if a.times[r] <= CLEAN * a.floor() and b.times[r] <= CLEAN * b.floor()]
    if len(clean) >= 2:
        common = clean
    return _trimmed(sorted(math.log(a.times[r] / b.times[r]) for r in common))


def _trimmed(logs: list[float]) -> Pair:
    """The 20% trimmed mean of sorted log-ratios and its standard error from the winsorized variance
    (Tukey and McLaughlin): a run slowed by a burst of load from elsewhere moves it little."""
    n = len(logs)
    if n == 0:
        return Pair(mean=0.0, se=math.inf, n=0)
    g = int(TRIM * n) if n >= 5 else 0
    kept = logs[g:n - g]
    mean = sum(kept) / len(kept)
    if n < 2:
        return Pair(mean=mean, se=math.inf, n=n)
    wins = [logs[g]] * g + kept + [logs[n - g - 1]] * g
    wmean = sum(wins) / n
    var = sum((x - wmean) ** 2 for x in wins) / (n - 1)
    return Pair(mean=mean, se=math.sqrt(var) / ((1 - 2 * g / n) * math.sqrt(n)), n=n, df=n - 2 * g - 1)


def _settled(e: Entrant) -> list[float]:
    return e.clean()


def median_ms(e: Entrant) -> float | None:
    v = _settled(e)
    if not v:
        return None
    m = len(v) // 2
    return (v[m] if len(v) % 2 else (v[m - 1] + v[m]) / 2) * 1e3


def spread_ms(e: Entrant) -> float:
    v = _settled(e)
    if len(v) < 2:
        return 0.0
    return (v[(3 * len(v)) // 4] - v[len(v) // 4]) * 1e3


def dominates(a: Entrant, b: Entrant) -> bool:
    """``a`` ran over 3x faster than ``b`` in every one of at least two rounds both ran: the hopeless
    rule's evidence, which settles a pair even before a t test on so few rounds could."""
    common = [r for r in a.times if r in b.times]
    return len(common) >= 2 and all(b.times[r] > HOPELESS * a.times[r] for r in common)


def choose(field_: Sequence[Entrant], default: Entrant, eps: float = EPSILON, level: float = LEVEL) -> Entrant:
    """The pick among the candidates still in: the default, unless another is confidently faster than
    it; among those eligible, the fastest by estimate, ties within epsilon broken by priority, then name."""
    eligible = [default] + [e for e in field_ if e is not default
                            and (pair(e, default).cdf(0.0) >= level or dominates(e, default))]
    rel = {e.name: pair(e, default).mean if e is not default else 0.0 for e in eligible}
    best = min(rel.values())
    tied = [e for e in eligible if rel[e.name] <= best + math.log1p(eps)]
    return min(tied, key=lambda e: (-e.priority, e.name))


def confidence(pick: Entrant, others: Sequence[Entrant], eps: float = EPSILON) -> float:
    """P(pick within epsilon of the fastest): the product over the others of P(log(t_pick/t_c) <= log(1+eps))."""
    p = 1.0
    for c in others:
        if c is not pick and not dominates(pick, c):
            p *= pair(pick, c).cdf(math.log1p(eps))
    return p


def _hopeless(ran: Sequence[Entrant], default: Entrant, rounds: int) -> None:
    """After the first two rounds: a candidate whose runs are both over 3x the best run leaves (a burst
    of load can slow one run 20x: one look is not enough), except the default (what any winner must
    beat)."""
    best = min((t for e in ran if not e.failed for t in e.times.values()), default=None)
    for e in ran:
        if best is None or e is default or e.failed or e.frozen or min(e.times.values()) <= HOPELESS * best:
            continue
        if rounds == 2 or (rounds == 1 and len(e.times) == 1 and e.times[0] > LONG_HOPELESS * best):
            e.out = (f"left after {len(e.times)} run(s): {min(e.times.values()) * 1e3:.3g} ms, over {HOPELESS:g}x "
                     f"the best run ({best * 1e3:.3g} ms)")
            e.frozen, e.hopeless = True, rounds == 2 and not e.reprieved


def _reprieve(entrants: Sequence[Entrant], active: Sequence[Entrant]) -> list[Entrant]:
    """Candidates the hopeless rule dropped on two runs whose second fell in a contended round (a
    candidate still in the race ran that round over CLEAN times its own fastest) are raced again, once,
    their two runs forgotten. A burst of load can slow one kernel 40x and the others 2x in the same
    rounds (seen: 5.8 ms twice for a 0.13 ms kernel, beside another at 2x its time). Round 0 carries
    warm-up, so round 1 is the evidence. A quiet race pays nothing for the check."""
    dirty = any(1 in s.times and s.times[1] > CLEAN * s.floor() for s in active)
    back = [e for e in entrants if e.hopeless and not e.reprieved] if dirty else []
    for e in back:
        e.out, e.frozen, e.hopeless, e.reprieved = "", False, False, True
        e.times.clear()
    return back


def _second_look(active: Sequence[Entrant], default: Entrant, rounds: int) -> bool:
    """After one round that spent the budget: whether a challenger ran over 3x faster than the default.
    One look cannot settle that (a burst of load can slow one run 20x), a second is what ``dominates``
    needs, and keeping the default on one look would serve the slower kernel for good: the default's
    own long run is what spent the budget (a 1 s brute force beside a 0.1 s kd-tree)."""
    if rounds != 1 or default.frozen or 0 not in default.times:
        return False
    return any(e is not default and not e.frozen and 0 in e.times and default.times[0] > HOPELESS * e.times[0]
               for e in active)


def _unsettled(entrants: Sequence[Entrant], active: Sequence[Entrant], default: Entrant, rounds: int, spent: float, budget_s: float) -> bool:
    """At the budget, before MIN_ROUNDS rounds: whether a challenger beat the default by over epsilon in
    every round it ran. So few rounds cannot make it confidently faster, so the default would keep the
    call and serve the slower kernel for good. The race then runs on to MIN_ROUNDS rounds, within EXTEND
    times the budget. Seen on the Xeon: bfloat16 prefill B=16 Hq=32 Hkv=16 L=547 D=48, five candidates of
    70-320 ms spent the 0.5 s budget in one round, and `fused` (the default) was kept at 169 ms against
    SDPA's 70 ms."""
    # the cap counts the candidates that run on: a frozen one's long run (its own measure) spent the
    # budget but takes no part in the rounds that follow (acme's 1.3 s beside 0.13-0.3 s kernels, seen)
    once = sum(sum(e.times.values()) for e in entrants if e.frozen)
    if rounds >= MIN_ROUNDS or spent - once >= EXTEND * budget_s or default.frozen or not default.times:
        return False
    return any(e is not default and not e.frozen and e.times
               and all(r in default.times and e.times[r] * (1 + EPSILON) < default.times[r] for r in e.times)
               for e in active)


def race(entrants: Sequence[Entrant], default: Entrant, *, budget_s: float, long_run_s: float, eps: float = EPSILON,
         combine: Callable[[list[float]], list[float]] | None = None,
         skip_first: Callable[[Entrant, float | None], bool] | None = None,
         clock: Callable[[], float] = time.perf_counter) -> Outcome:
    """Run the race in place: ``entrants`` get their times, and ``out`` reasons when they leave.

    ``combine`` max-combines one round's figures across ranks (lockstep): every rank then sees the
    same times and the same elapsed time, so all take the same drops and stops. ``skip_first(e, best)``
    is asked before a candidate's first run with the best first run so far (the pilot's hopeless rule:
    True means it never runs; it sets ``e.out``). A first run of ``long_run_s`` or more is not
    repeated; a candidate whose first run is over 3x the best first run leaves at once."""
    active = list(entrants)
    start = clock()
    rounds = 0
    hold = 0  # rounds before which the budget does not end the race (a reprieve's own rounds)
    stop = "budget"
    shuffle = random.Random(ORDER_SEED).shuffle
    while True:
        order = list(active)
        if rounds > 0:  # round 0 in the given (pilot) order
            shuffle(order)
        got: list[float] = []
        ran: list[Entrant] = []
        elapsed = 0.0
        for e in order:
            if e.frozen:
                continue
            if rounds == 0 and skip_first is not None:
                best = min((x.times[0] for x in ran if 0 in x.times and not x.failed), default=None)
                if skip_first(e, best):
                    continue
            t = e.run()
            got.append(t)
            ran.append(e)
            if combine is None:
                e.times[rounds] = t
        if combine is not None:
            *got, elapsed = combine([*got, clock() - start])
            for e, t in zip(ran, got):
                e.times[rounds] = t
        for e in ran:
            if e.times[rounds] == math.inf:
                e.failed, e.frozen = True, True
                del e.times[rounds]
                e.out = e.out or "raised while timed"
            elif rounds == 0 and e.times[0] >= long_run_s:
                e.frozen = True
        rounds += 1
        if rounds <= 2:
            _hopeless(ran, default, rounds)
        active = [e for e in active if not e.out and e.times]
        if not active:
            return Outcome(pick=None, confidence=0.0, rounds=rounds, stop="none", noise=0.0, gap=0.0, contended=False)
        if default not in active:
            default = min(active, key=lambda e: (-e.priority, e.name))
        ended = None
        if len(active) == 1:
            ended = "alone"
        elif rounds >= MIN_ROUNDS or all(e.frozen for e in active):
            leader = min(active, key=lambda e: pair(e, default).mean if e is not default else 0.0)
            for e in active:
                p = pair(e, leader)
                if e is leader or e is default:
                    continue
                if p.cdf(0.0) <= 1 - LEVEL:
                    e.out = f"left the race after {p.n} rounds: confidently slower than {leader.name} (x{math.exp(p.mean):.3f})"
                elif e.reprieved and dominates(leader, e):
                    e.out = f"left after a second chance: over {HOPELESS:g}x {leader.name}'s time in {p.n} rounds"
            active = [e for e in active if not e.out]
            pick = choose(active, default, eps)
            if len(active) == 1:
                ended = "alone"
            elif all(dominates(pick, c) or pair(pick, c).cdf(math.log1p(eps)) >= LEVEL for c in active if c is not pick):
                tie = all(abs(pair(pick, c).mean) <= math.log1p(eps) for c in active if c is not pick)
                ended = "tie" if tie else "confident"
        spent = clock() - start if combine is None else elapsed
        if ended is None and (all(e.frozen for e in active) or rounds >= MAX_ROUNDS or (
                rounds >= hold and spent >= budget_s and not _second_look(active, default, rounds)
                and not _unsettled(entrants, active, default, rounds, spent, budget_s))):
            ended = "budget"
        if ended is not None:
            back = _reprieve(entrants, active) if rounds < MAX_ROUNDS else []
            if not back:
                stop = ended
                break
            active = [*active, *back]
            hold = rounds + MIN_ROUNDS
    # the final pick: another beats the default at the stated confidence (one look, so not the race's
    # stricter level)
    pick = choose(active, default, eps, STATED) if len(active) > 1 else active[0]
    others = [e for e in entrants if e is not pick and e.times and not e.out]
    conf = confidence(pick, others, eps)
    pairs = [pair(pick, c) for c in others if not (pick.frozen or c.frozen)]
    noise = sorted(p.se * math.sqrt(p.n) for p in pairs)[len(pairs) // 2] if pairs else 0.0
    gap = min((abs(p.mean) for p in pairs), default=math.inf)
    # contended: unresolved, and one round's paired ratio scatters far beyond epsilon (the differences
    # that matter); such a decision serves this process but is not stored as final
    dirty = sum(len(e.times) - len(e.clean()) for e in [pick, *others]) / max(1, sum(len(e.times) for e in [pick, *others]))
    contended = conf < STATED and (noise > CONTENTION * math.log1p(eps) or dirty > 0.5)
    return Outcome(pick=pick.name, confidence=conf, rounds=rounds, stop=stop, noise=noise, gap=gap, contended=contended)


# -- neighbours: predictions for unseen keys --------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    winner: str
    shortlist: tuple[str, ...]
    neighbours: int
    distance: float


def _as_int(x: Any) -> int | None:
    try:
        v = int(x)
    except (TypeError, ValueError):
        return None
    return v if str(v) == str(x) else None


def predict(spec: Any, key: Sequence[Any], known: Mapping[tuple[Any, ...], Mapping[str, Any]],
            reach: float = 2.0) -> Prediction | None:
    """A predicted winner and shortlist for ``key`` from decided keys of the same op: the same non-size
    parts (``spec.key_sizes`` names the size parts), sizes within ``reach`` buckets (sum of |log2|
    steps). The nearest neighbours vote; the shortlist is each neighbour's winner and every candidate
    it measured within 25% of its winner."""
    sizes = tuple(getattr(spec, "key_sizes", ()) or ())
    if not sizes:
        return None
    me = [str(k) for k in key]
    best: list[tuple[float, Mapping[str, Any]]] = []
    for other, entry in known.items():
        o = [str(k) for k in other]
        if len(o) != len(me) or o == me or not entry.get("winner"):
            continue
        if any(o[i] != me[i] for i in range(len(me)) if i not in sizes):
            continue
        dist = 0.0
        for i in sizes:
            a, b = _as_int(me[i]), _as_int(o[i])
            if a is None or b is None:
                dist = math.inf
                break
            dist += abs(math.log2(max(a, 1)) - math.log2(max(b, 1)))
        if dist <= reach:
            best.append((dist, entry))
    if not best:
        return None
    nearest = min(d for d, _ in best)
    close = [(d, e) for d, e in best if d <= nearest + 1.0]
    votes: dict[str, float] = {}
    shortlist: list[str] = []
    for d, e in sorted(close, key=lambda x: x[0]):
        votes[e["winner"]] = votes.get(e["winner"], 0.0) + 1.0 / (1.0 + d)
        times = {r["backend"]: r.get("median_ms") for r in e.get("rows", []) if r.get("median_ms") is not None}
        wt = times.get(e["winner"])
        for name in [e["winner"], *sorted(times, key=times.get)]:
            if name not in shortlist and (name == e["winner"] or (wt and times[name] <= 1.25 * wt)):
                shortlist.append(name)
    winner = max(sorted(votes), key=lambda n: votes[n])
    shortlist.remove(winner)
    return Prediction(winner=winner, shortlist=(winner, *shortlist), neighbours=len(close), distance=nearest)
