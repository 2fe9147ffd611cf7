"""The JSON tuning cache: fingerprints, atomic merge-on-write across processes, corrupt files."""
from __future__ import annotations

import json
import multiprocessing as mp

import pytest
import torch

from core.cache import FILE_NAME, CacheWarning, TuningCache, fingerprint, fingerprint_id

FP = {"python": "3.11", "torch": "2.13.0", "plugins": {"torch": "0.1.0"}, "device": "cpu", "cpu": "test", "threads": 2}


def _writer(directory: str, worker: int, count: int) -> None:
    cache = TuningCache(__import__("pathlib").Path(directory), FP)
    for i in range(count):
        cache.store("attention", ("cpu", worker, i), {"winner": f"w{worker}-{i}", "rows": []})


def test_roundtrip_and_other_fingerprint_not_used(tmp_path):
    a = TuningCache(tmp_path, FP)
    a.store("attention", ("cpu", 1), {"winner": "torch", "rows": []})
    assert TuningCache(tmp_path, FP).lookup("attention", ("cpu", 1))["winner"] == "torch"
    other = dict(FP, torch="9.9.9")
    b = TuningCache(tmp_path, other)
    assert b.lookup("attention", ("cpu", 1)) is None
    b.store("attention", ("cpu", 1), {"winner": "reference", "rows": []})
    assert TuningCache(tmp_path, FP).lookup("attention", ("cpu", 1))["winner"] == "torch"  # kept apart
    data = json.loads((tmp_path / FILE_NAME).read_text())
    assert data["schema"] == 1 and len(data["environments"]) == 2


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entries = TuningCache(tmp_path, FP).entries()
    assert len(entries) == 60
    assert {e["winner"] for e in entries.values()} == {f"w{w}-{i}" for w in range(4) for i in range(15)}
    json.loads((tmp_path / FILE_NAME).read_text())  # never torn
    assert not list(tmp_path.glob(".tuning-cache-*.tmp"))


MALFORMED = [
    json.dumps({"schema": 1, "environments": {"abc": {"fingerprint": FP, "entries": []}}}),  # entries a list
    json.dumps({"schema": 1, "environments": {"abc": {"fingerprint": FP, "entries": {"attention|[]": "x"}}}}),
    json.dumps({"schema": 1, "environments": {"abc": "not an environment"}}),
]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema": 99, "environments": {}}), "[]", *MALFORMED])
def test_corrupt_or_foreign_file_is_moved_aside(tmp_path, content):
    (tmp_path / FILE_NAME).write_text(content)
    cache = TuningCache(tmp_path, FP)
    with pytest.warns(CacheWarning, match="moved it to"):
        assert cache.lookup("attention", ("cpu",)) is None
    aside = list(tmp_path.glob(f"{FILE_NAME}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == content
    cache.store("attention", ("cpu",), {"winner": "torch", "rows": []})
    assert TuningCache(tmp_path, FP).lookup("attention", ("cpu",))["winner"] == "torch"


def test_fingerprint_fields():
    fp = fingerprint({"torch": "0.1.0"})
    for field in ("python", "torch", "plugins", "device", "cpu", "threads", "torch_isa"):
        assert field in fp
    assert fp["plugins"] == {"torch": "0.1.0"}
    assert fp["torch_isa"][0] == torch.backends.cpu.get_cpu_capability()


def test_library_isa_limits_change_the_fingerprint(monkeypatch):
    """A process that holds oneDNN (or MKL, or torch's own kernels) to AVX2 times torch's kernels
    differently: decisions tuned without the limit must not carry over to it."""
    plain = fingerprint_id(fingerprint({"torch": "0.1.0"}))
    for var, value in (("ONEDNN_MAX_CPU_ISA", "AVX2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
                       ("ATEN_CPU_CAPABILITY", "avx2")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            assert fingerprint_id(fingerprint({"torch": "0.1.0"})) != plain, var
    assert fingerprint_id(fingerprint({"torch": "0.1.0"})) == plain


def test_entries_keep_confidence_finality_and_key(tmp_path):
    a = TuningCache(tmp_path, FP)
    a.store("attention", ("cpu", 8), {"winner": "torch", "rows": [], "confidence": 0.97, "final": True,
                                      "key": ["cpu", 8]})
    a.store("attention", ("cpu", 16), {"winner": "fused", "rows": [], "confidence": 0.4, "final": False,
                                       "key": ["cpu", 16]})
    b = TuningCache(tmp_path, FP)
    assert b.lookup("attention", ("cpu", 8))["confidence"] == 0.97
    assert b.lookup("attention", ("cpu", 16))["final"] is False and b.lookup("attention", ("cpu", 16))["key"] == ["cpu", 16]
