"""The tuner end to end: confidence in explain and the cache, contended decisions retuned, predicted
winners for unseen keys, record and replay (record, replay ahead of time, rerun with zero tuning)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core import dispatcher, racing, tuning
from core.cache import FILE_NAME, cache_dir
from core.ops.attention import make_inputs
from plugins.reference.attention import attention as reference_attention

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch, tmp_path):
    monkeypatch.setenv("SWITCHYARD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SWITCHYARD_RECORD", raising=False)
    dispatcher.reset()
    yield
    dispatcher.reset()


def _attention(gen, Lq, Lk=None):
    return make_inputs(gen, "cpu", torch.float32, 1, 2, 2, Lq, Lk or Lq, 16)


def _ref(q, k, v):
    return reference_attention(q.double(), k.double(), v.double(), causal=False, scale=1 / math.sqrt(q.shape[-1]),
                               attn_mask=None, return_lse=False)


def _entries():
    data = json.loads((cache_dir() / FILE_NAME).read_text())
    return {k: e for env in data["environments"].values() for k, e in env["entries"].items()}


def test_explain_and_cache_carry_the_confidence(gen):
    q, k, v = _attention(gen, 40)
    out = dispatcher.attention(q, k, v)
    assert float((out.double() - _ref(q, k, v)).abs().max()) < 1e-5
    exp = dispatcher.explain("attention", q, k, v)
    assert exp.confidence is not None and 0.0 <= exp.confidence <= 1.0
    assert "confidence" in str(exp) and "interleaved rounds" in exp.why
    (entry,) = _entries().values()
    assert entry["confidence"] == exp.confidence and entry["final"] is True or entry["final"] is False
    assert entry["key"][0] == "cpu" and entry["winner"] == exp.chosen


def test_a_contended_decision_is_not_final_and_a_later_miss_retunes(gen, monkeypatch):
    real = racing.race

    def contended(*a, **kw):
        return replace(real(*a, **kw), contended=True, confidence=0.4)

    monkeypatch.setattr(racing, "race", contended)
    q, k, v = _attention(gen, 24)
    dispatcher.attention(q, k, v)
    exp = dispatcher.explain("attention", q, k, v)
    assert "not stored as final" in exp.why
    (entry,) = _entries().values()
    assert entry["final"] is False
    monkeypatch.setattr(racing, "race", real)
    dispatcher.reset()  # a new process: the non-final entry is not served, the key is tuned again
    calls = []
    orig = tuning.Tuner._tune
    monkeypatch.setattr(tuning.Tuner, "_tune", lambda self, *a, **kw: calls.append(1) or orig(self, *a, **kw))
    assert "from the tuning cache" not in dispatcher.explain("attention", q, k, v).why
    assert calls == [1]


def test_predict_serves_the_neighbours_winner_validated_and_untimed(gen, monkeypatch):
    for L in (32, 128):  # decided neighbours, one size bucket either side of 64
        dispatcher.attention(*_attention(gen, L))
    winners = {d.winner for (op, _), d in dispatcher.tuner().decisions.items() if op == "attention"}
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "predict")
    q, k, v = _attention(gen, 64)
    out = dispatcher.attention(q, k, v)
    assert float((out.double() - _ref(q, k, v)).abs().max()) < 1e-5
    exp = dispatcher.explain("attention", q, k, v)
    assert exp.why.startswith("predicted from 2 neighbouring") and exp.chosen in winners
    assert all(r.median_ms is None for r in exp.rows)  # not timed
    assert {r.backend for r in exp.rows if r.status == "wrong"} == set()
    assert next(r for r in exp.rows if r.backend == exp.chosen).max_error is not None  # validated
    # no neighbour: predict tunes the key as lazy does
    q, k, v = make_inputs(gen, "cpu", torch.float32, 1, 3, 1, 8, 8, 8)
    assert dispatcher.explain("attention", q, k, v).why.startswith("fastest of")


def test_predict_refuses_a_winner_that_fails_validation(gen, monkeypatch, plugin_marker):
    """A neighbour's winner that is wrong at this key is not served: the trust rule stands."""
    tuner = dispatcher.tuner()
    q, k, v = _attention(gen, 64)
    spec = __import__("core.ops", fromlist=["get_spec"]).get_spec("attention")
    args, attrs = spec.prepare((q, k, v), {})
    near = spec.key(*spec.prepare(_attention(gen, 32), {}))
    tuner.decisions[("attention", near)] = tuning.Decision(op="attention", key=near, winner="bad-values", rows=(),
                                                           why="planted", source="tuned", confidence=1.0)
    monkeypatch.setenv("SWITCHYARD_AUTOTUNE", "predict")
    out = dispatcher.attention(q, k, v)
    assert float((out.double() - _ref(q, k, v)).abs().max()) < 1e-5
    exp = dispatcher.explain("attention", q, k, v)
    assert exp.chosen != "bad-values" and not exp.why.startswith("predicted")


@pytest.fixture
def plugin_marker():
    import bad_kernels
    from registry import loader

    loader.add_plugin(bad_kernels.BadPlugin(), "bad")
    yield
    loader.remove_plugin("bad")
    dispatcher.reset()


PROGRAM = """
import sys, torch
from core import dispatcher, tuning
calls = []
orig = tuning.Tuner._tune
tuning.Tuner._tune = lambda self, *a, **kw: calls.append(a[1]) or orig(self, *a, **kw)
g = torch.Generator().manual_seed(int(sys.argv[1]))
for L in (24, 80):
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    dispatcher.attention(q, k, v, causal=True)
x = torch.randn(3000, generator=g)
dispatcher.precision_cast(x, dtype=torch.bfloat16)
q, db = torch.rand(50, 4, generator=g), torch.rand(400, 4, generator=g)
dispatcher.nearest_neighbor(q, db, k=3)
w = torch.randn(1, 2, 16, 8, generator=g, requires_grad=True)
dispatcher.attention(w, w.detach(), w.detach()).sum().backward()
print("TUNED", len(calls))
"""


def test_record_replay_then_the_program_tunes_nothing(tmp_path):
    env = dict(os.environ, SWITCHYARD_CACHE_DIR=str(tmp_path / "cache"), SWITCHYARD_RECORD=str(tmp_path / "keys.jsonl"))
    first = subprocess.run([sys.executable, "-c", PROGRAM, "1"], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    assert "TUNED 5" in first.stdout
    lines = [json.loads(s) for s in (tmp_path / "keys.jsonl").read_text().splitlines()]
    assert [ln["op"] for ln in lines] == ["attention", "attention", "precision_cast", "nearest_neighbor", "attention"]
    assert lines[0]["args"][0]["tensor"]["shape"] == [1, 2, 24, 16] and lines[-1]["key"][-1] == "grad"
    # a fresh cache: only the replay fills it
    env = dict(os.environ, SWITCHYARD_CACHE_DIR=str(tmp_path / "replayed"))
    env.pop("SWITCHYARD_RECORD", None)
    replay = subprocess.run([sys.executable, "-m", "core.autotune", "--replay", str(tmp_path / "keys.jsonl"),
                             "--budget", "0.05", "--json", str(tmp_path / "rows.json")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert replay.returncode == 0, replay.stderr
    assert "replayed" in replay.stdout and "confidence" in replay.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len({r["case"] for r in rows}) == 5 and sum(r["status"] == "chosen" for r in rows) == 5
    again = subprocess.run([sys.executable, "-c", PROGRAM, "2"], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "TUNED 0" in again.stdout, again.stdout


def test_replay_rejects_a_malformed_record(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"op": "attention"}\n')
    env = dict(os.environ, SWITCHYARD_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-m", "core.autotune", "--replay", str(bad)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "line 1: expected an object with op, key, args, attrs" in out.stderr


def test_the_dispatcher_serves_the_decided_winner_even_when_another_has_a_lower_median(gen, monkeypatch):
    """A tie within epsilon goes to priority, and the default keeps its place unless beaten at the stated
    confidence: the kernel served is the decision's winner, not whichever row has the lowest median."""
    real = racing.race

    def prefer_slowest(entrants, default, **kw):
        out = real(entrants, default, **kw)
        timed = [e for e in entrants if e.times]
        slowest = max(timed, key=lambda e: racing.median_ms(e) or 0.0)
        return replace(out, pick=slowest.name)

    monkeypatch.setattr(racing, "race", prefer_slowest)
    q, k, v = _attention(gen, 20)
    out = dispatcher.attention(q, k, v)
    assert float((out.double() - _ref(q, k, v)).abs().max()) < 1e-5
    exp = dispatcher.explain("attention", q, k, v)
    medians = {r.backend: r.median_ms for r in exp.rows if r.median_ms is not None}
    assert len(medians) >= 2 and medians[exp.chosen] == max(medians.values())
    spec = __import__("core.ops", fromlist=["get_spec"]).get_spec("attention")
    key = spec.key(*spec.prepare((q, k, v), {}))
    assert dispatcher._state.choices[("attention", key)].name == exp.chosen


def _shortlisted_race(monkeypatch, pick):
    """Neighbours that predict `torch` alone (shortlist: torch, beside the default), and a race that records
    each field it is given and returns ``pick(race_number, default_name, outcome)`` as its pick."""
    monkeypatch.setattr(tuning.Tuner, "_predict",
                        lambda self, spec, key: racing.Prediction(winner="torch", shortlist=("torch",), neighbours=2,
                                                                  distance=1.0))
    real, fields = racing.race, []

    def race(entrants, default, **kw):
        fields.append(sorted(e.name for e in entrants))
        out = real(entrants, default, **kw)
        return replace(out, pick=pick(len(fields), default.name, out))

    monkeypatch.setattr(racing, "race", race)
    return fields


def test_a_shortlist_that_loses_to_its_fallback_sends_the_whole_field_to_the_race(gen, monkeypatch):
    """A neighbour-predicted shortlist races only its favourites beside the default (a fallback). When the
    favourites lose there, the prediction is contradicted: every validated candidate is raced, so a kernel
    off the shortlist can still win, and none stays marked untimed."""
    q, k, v = _attention(gen, 48)
    fields = _shortlisted_race(monkeypatch, lambda n, default, out: default if n == 1 else out.pick)
    out = dispatcher.attention(q, k, v)
    assert float((out.double() - _ref(q, k, v)).abs().max()) < 1e-5
    exp = dispatcher.explain("attention", q, k, v)
    timed = sorted(r.backend for r in exp.rows if r.status in ("ok", "chosen") and r.backend != "reference")
    assert len(fields) == 2 and len(timed) > 2
    default = min((r for r in exp.rows if r.backend in timed), key=lambda r: (-r.priority, r.backend)).backend
    assert fields[0] == sorted({"torch", default})
    assert fields[1] == timed
    assert all(r.median_ms is not None for r in exp.rows if r.backend in timed)
    assert not any("off the shortlist" in r.reason for r in exp.rows)


def test_a_shortlist_whose_favourite_wins_races_nothing_more(gen, monkeypatch):
    """Where the shortlist's favourite wins, the decision stands after the one short race (the cost the
    shortlist saves), and the candidates off it are reported as not timed."""
    q, k, v = _attention(gen, 48)
    fields = _shortlisted_race(monkeypatch, lambda n, default, out: "torch")
    dispatcher.attention(q, k, v)
    exp = dispatcher.explain("attention", q, k, v)
    assert len(fields) == 1 and exp.chosen == "torch" and len(fields[0]) == 2
    assert any("off the shortlist" in r.reason for r in exp.rows)
