"""plugins/fused/_build.py's instruction-set levels: which level a CPU's flags select, what a level is
compiled with, and how forced_isa and SWITCHYARD_CPU_ISA pick a lower one (no compiler runs here)."""
from __future__ import annotations

import pytest

from core import cpp
from plugins.fused import _build

ZEN3 = {"sse2", "avx", "avx2", "fma", "f16c", "bmi2"}  # an AMD EPYC Zen 3: AVX2, no AVX-512
SAPPHIRE_RAPIDS = ZEN3 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_fp16", "amx_tile"}


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be an x86 CPU with the given /proc/cpuinfo flags (the level caches are reset)."""
    def pretend(flags):
        monkeypatch.setattr(_build.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(_build, "_cpu_flags", lambda: set(flags))
        monkeypatch.setattr(_build, "_machine", None)
        monkeypatch.setattr(_build, "_from_env", None)
        monkeypatch.setattr(_build, "_forced", None)
    yield pretend


@pytest.mark.parametrize("flags, best", [(SAPPHIRE_RAPIDS, "avx512"), (ZEN3, "avx2"), (ZEN3 - {"f16c"}, "scalar"),
                                         ({"sse2"}, "scalar"), (SAPPHIRE_RAPIDS - {"avx512bw"}, "avx2")])
def test_machine_level_from_flags(cpu, flags, best):
    cpu(flags)
    assert _build.machine_isa() == best
    assert _build.supported_isas() == _build.ISA_LEVELS[_build.ISA_LEVELS.index(best):]
    assert _build.default_isa() == best


def test_level_flags():
    """AVX-512 is x86-64-v4; the AVX2 level is x86-64-v3 (which has F16C and FMA) with AVX-512 off, so
    a compiler that would otherwise enable it cannot; the scalar level is baseline x86-64."""
    if _build.platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the levels add flags on x86 only")
    assert "-march=x86-64-v4" in _build.isa_flags("avx512")
    assert "-march=x86-64-v3" in _build.isa_flags("avx2") and "-mno-avx512f" in _build.isa_flags("avx2")
    assert _build.isa_flags("scalar") == ["-march=x86-64", "-mtune=generic"]
    for isa in _build.ISA_LEVELS:
        assert "-march=native" not in _build.isa_flags(isa)
        assert f"-DSWITCHYARD_NS=switchyard_{isa}" in _build._flags(isa)


def test_forced_isa_picks_a_lower_level_and_restores(cpu):
    cpu(SAPPHIRE_RAPIDS)
    with _build.forced_isa("avx2"):
        assert _build.default_isa() == "avx2"
        with _build.forced_isa("scalar"):
            assert _build.default_isa() == "scalar"
        assert _build.default_isa() == "avx2"
    assert _build.default_isa() == "avx512"


def test_forced_isa_refuses_what_the_cpu_lacks(cpu):
    cpu(ZEN3)
    with pytest.raises(ValueError, match="avx512.*needs CPU flags"):
        with _build.forced_isa("avx512"):
            pass
    with pytest.raises(ValueError, match="expected one of"):
        with _build.forced_isa("sse9"):
            pass


def test_environment_level(cpu, monkeypatch):
    cpu(SAPPHIRE_RAPIDS)
    monkeypatch.setenv(_build.ENV_ISA, " AVX2 ")
    assert _build.default_isa() == "avx2"
    cpu(ZEN3)
    monkeypatch.setenv(_build.ENV_ISA, "avx512")
    with pytest.raises(ValueError, match=_build.ENV_ISA):
        _build.default_isa()


def test_loading_a_library_leaves_the_build_flags_alone():
    """torch's load() appends its link flags to the list it is given; were that our LDFLAGS, every
    later build directory's hash in the process would change and each op would be compiled again."""
    if _build.unavailable_reason("split_finding"):
        pytest.skip(_build.unavailable_reason("split_finding"))
    before = (list(_build.LDFLAGS), _build._build_dir("split_finding", [_build.CSRC / "split_finding.cpp"], "avx2"))
    for isa in ("avx2", _build.machine_isa()):
        _build.library("split_finding", isa)
    after = (list(_build.LDFLAGS), _build._build_dir("split_finding", [_build.CSRC / "split_finding.cpp"], "avx2"))
    assert after == before
    assert _build.is_built("split_finding", "avx2")


def test_the_tuning_cache_keeps_apart_decisions_of_other_levels_and_sources(monkeypatch, tmp_path):
    # an AVX2 run on an AVX-512 machine (same CPU model, same package version) was served the AVX-512
    # run's decisions: the fused backend's version names its level and its sources' hash
    from core.cache import fingerprint, fingerprint_id

    ids = {}
    for isa in ("avx512", "avx2", "scalar"):
        monkeypatch.setattr(_build, "_from_env", isa)
        version = _build.plugin_version()
        assert f"+{isa}." in version
        ids[isa] = fingerprint_id(fingerprint({"fused": version}))
    assert len(set(ids.values())) == 3
    source = tmp_path / "csrc"
    source.mkdir()
    for cpp in _build.CSRC.glob("*.cpp"):
        (source / cpp.name).write_bytes(cpp.read_bytes())
    before = _build.plugin_version()
    monkeypatch.setattr(_build, "CSRC", source)
    assert _build.plugin_version() == before  # the same sources elsewhere: the same version
    (source / "attention.cpp").write_bytes((source / "attention.cpp").read_bytes() + b"\n// edited\n")
    assert _build.plugin_version() != before


def test_a_loaded_library_needs_no_tool_look_up(monkeypatch):
    # kernels ask unavailable_reason on every forced call (use_backend): the PATH searches for a compiler
    # and ninja cost about 70 us a call, and a built library needs neither
    if _build.unavailable_reason("split_finding"):
        pytest.skip(_build.unavailable_reason("split_finding"))
    _build.library("split_finding")

    def no_search(*args, **kwargs):
        raise AssertionError("a PATH search for a loaded library")

    monkeypatch.setattr(cpp.shutil, "which", no_search)
    assert _build.unavailable_reason("split_finding") is None
    monkeypatch.setenv(_build.ENV_DISABLE, "1")  # the off switch still holds
    assert _build.ENV_DISABLE in _build.unavailable_reason("split_finding")
