"""Compile-at-first-use for the fused backend's C++ kernels, kept in one place for every op.

Each ``csrc/<op>.cpp`` holds its kernels and a ``TORCH_LIBRARY_FRAGMENT(SWITCHYARD_NS, m)`` block, and
includes only ATen (not ``torch/extension.h``), which halves the compile time; a source whose small
calls matter also exposes its entry points as a pybind11 module (``module(op)``: ATen plus
``torch/csrc/utils/pybind.h`` adds about 7 s to its build, and saves about 1.8 us a call).
``library(op)`` builds it through ``torch.utils.cpp_extension.load`` into the project's cache directory
(one folder per source hash, compiler flags, torch and Python version, so a stale build is never
loaded), loads it, and returns its op namespace, ``torch.ops.switchyard_<isa>``.

Instruction-set levels, not ``-march=native``: each source is built for one level, ``avx512``
(x86-64-v4: AVX-512 F/BW/DQ/VL, with AVX2, FMA and F16C), ``avx2`` (x86-64-v3: AVX2, FMA, F16C, no
AVX-512) or ``scalar`` (baseline x86-64, or the compiler's default elsewhere), and the sources pick
their code paths with ``#if defined(__AVX512F__)`` / ``__AVX2__`` / ``__F16C__``. ``library(op)``
takes the best level this CPU has (``machine_isa()``); ``SWITCHYARD_CPU_ISA`` or ``forced_isa(...)``
picks a lower one, and ``library(op, isa)`` loads a given level beside the default one (each level
registers its own namespace, so the test suite checks the AVX2 path on an AVX-512 machine). The first build of an op takes about 10-30 s; later processes
load the cached library in milliseconds. When no compiler is present, ``unavailable_reason()`` says
so, every fused CPU kernel declares it as its reason, and dispatch goes on without them.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from core import cpp

CSRC = Path(__file__).resolve().parent / "csrc"
CFLAGS = ["-O3", "-fopenmp", "-std=c++17"]
LDFLAGS = ["-fopenmp"]
ENV_DISABLE = cpp.ENV_DISABLE
ENV_ISA = "SWITCHYARD_CPU_ISA"

ISA_LEVELS = ("avx512", "avx2", "scalar")  # best first
# What each level needs of the CPU (its /proc/cpuinfo flags) and the flags it is compiled with.
_ISA_NEEDS = {
    "avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c", "bmi2"},
    "avx2": {"avx2", "fma", "f16c", "bmi2"},
    "scalar": set(),
}
_ISA_FLAGS_X86 = {
    "avx512": ["-march=x86-64-v4", "-mf16c", "-mfma", "-mtune=generic"],
    "avx2": ["-march=x86-64-v3", "-mno-avx512f", "-mtune=generic"],
    "scalar": ["-march=x86-64", "-mtune=generic"],
}

_lock = threading.Lock()
_loaded: dict[tuple[str, str], Any] = {}
_modules: dict[tuple[str, str], Any] = {}  # (op, isa) -> the pybind11 module, for sources that define one
_failed: dict[tuple[str, str], str] = {}
_forced: str | None = None
_machine: str | None = None
_from_env: str | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_flags() -> frozenset[str]:
    """This CPU's /proc/cpuinfo flags (empty off x86 or where it cannot tell)."""
    return frozenset(_cpu_flags() if platform.machine() in ("x86_64", "AMD64") else ())


def machine_isa() -> str:
    """The best instruction-set level this CPU runs (``scalar`` off x86 or when it cannot tell)."""
    global _machine
    if _machine is None:
        _machine = next(isa for isa in ISA_LEVELS if _ISA_NEEDS[isa] <= cpu_flags())
    return _machine


def supported_isas() -> tuple[str, ...]:
    """Every level this CPU can run, best first (each is a separate build)."""
    best = ISA_LEVELS.index(machine_isa())
    return ISA_LEVELS[best:]


def _check_isa(isa: str, source: str) -> str:
    if isa not in ISA_LEVELS:
        raise ValueError(f"{source}: expected one of {list(ISA_LEVELS)}, got {isa!r}")
    if isa not in supported_isas():
        raise ValueError(f"{source}: {isa!r} needs CPU flags {sorted(_ISA_NEEDS[isa])}; this CPU runs "
                         f"{list(supported_isas())}")
    return isa


def _env_isa() -> str:
    """``SWITCHYARD_CPU_ISA`` (read once per process: kernels ask on every call), else the machine's best."""
    global _from_env
    if _from_env is None:
        env = os.environ.get(ENV_ISA, "").strip().lower()
        _from_env = _check_isa(env, ENV_ISA) if env else machine_isa()
    return _from_env


def default_isa() -> str:
    """The level ``library(op)`` loads: ``forced_isa``, else ``SWITCHYARD_CPU_ISA``, else the machine's best."""
    return _forced or _env_isa()


@contextlib.contextmanager
def forced_isa(isa: str) -> Iterator[None]:
    """Make ``library(op)`` load the ``isa`` build inside this block (tests run a lower level's path)."""
    global _forced
    previous, _forced = _forced, _check_isa(isa, "forced_isa")
    try:
        yield
    finally:
        _forced = previous


def isa_flags(isa: str) -> list[str]:
    """The compiler flags of one level (none beyond the defaults off x86)."""
    return _ISA_FLAGS_X86[isa] if platform.machine() in ("x86_64", "AMD64") else []


def unavailable_reason(op: str | None = None) -> str | None:
    """Why the C++ kernels (of ``op``) cannot be built here, or None when they can. Cheap."""
    reason = cpp.disabled_reason()
    if reason:
        return reason
    if op is not None and (op, default_isa()) in _loaded:
        return None  # built and loaded: no tool is needed any more (their look-ups cost ~70 us a call)
    reason = cpp.tools_reason()
    if reason:
        return reason
    if op is not None:
        failed = _failed.get((op, default_isa()))
        if failed is not None:
            return f"its C++ build failed earlier in this process: {failed}"
    return None


build_root = cpp.build_root


def _flags(isa: str) -> list[str]:
    return CFLAGS + isa_flags(isa) + [f"-DSWITCHYARD_NS=switchyard_{isa}"]


def plugin_version() -> str:
    """The fused backend's version as the tuning cache's fingerprint sees it: the package's, plus the
    instruction-set level its C++ kernels load (``SWITCHYARD_CPU_ISA``, else the machine's best) and a
    hash of the backend's sources. A decision made with other kernels (another level on the same CPU, an
    edited source) is then never served: an AVX2 run on an AVX-512 machine was served the AVX-512
    run's decisions."""
    from importlib import metadata

    try:
        base = metadata.version("switchyard")
    except metadata.PackageNotFoundError:
        base = "0"
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for group in (here.glob("*.py"), here.glob("triton/*.py"), CSRC.glob("*.cpp"), CSRC.glob("*.h")):
        for src in sorted(group, key=lambda path: path.name):
            h.update(src.name.encode())
            h.update(src.read_bytes())
    try:
        level = _env_isa()
    except ValueError:  # a bad SWITCHYARD_CPU_ISA: the kernels' first build says so, as without this
        level = "unknown"
    return f"{base}+{level}.{h.hexdigest()[:12]}"


def _build_dir(op: str, sources: list[Path], isa: str) -> Path:
    import torch

    h = hashlib.sha256()
    for src in sources:
        h.update(src.read_bytes())
    h.update(" ".join(_flags(isa) + LDFLAGS).encode())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}".encode())
    return build_root() / f"{op}-{isa}-{h.hexdigest()[:16]}"


def is_built(op: str, isa: str | None = None) -> bool:
    """Whether ``csrc/<op>.cpp`` has a cached build for this source, these flags and this level."""
    isa = isa or default_isa()
    source = CSRC / f"{op}.cpp"
    return source.exists() and (_build_dir(op, [source], isa) / f"switchyard_{op}_{isa}.so").exists()


def library(op: str, isa: str | None = None) -> Any:
    """Build (first use) and load ``csrc/<op>.cpp`` for ``isa`` (default: ``default_isa()``); returns its
    op namespace ``torch.ops.switchyard_<isa>``."""
    isa = isa or _forced or _env_isa()
    lib = _loaded.get((op, isa))
    if lib is not None:
        return lib
    with _lock:
        if (op, isa) in _loaded:
            return _loaded[(op, isa)]
        _check_isa(isa, "isa")
        reason = unavailable_reason()
        if reason is None and (op, isa) in _failed:
            reason = f"its C++ build failed earlier in this process: {_failed[(op, isa)]}"
        if reason:
            raise RuntimeError(f"fused {op}: {reason}")
        import torch
        from torch.utils.cpp_extension import load

        cpp.put_ninja_on_path()
        sources = [CSRC / f"{op}.cpp"]
        build = _build_dir(op, sources, isa)
        build.mkdir(parents=True, exist_ok=True)
        if not (build / f"switchyard_{op}_{isa}.so").exists():  # say why this call waits (once per build)
            __import__("logging").getLogger("switchyard.build").warning(
                "switchyard: compiling the fused C++ kernels of %s for %s (first use of this source and level; about "
                "10-80 s, cached afterwards; `python -m core.autotune --build` does it ahead of time)", op, isa)
        python_module = b"PYBIND11_MODULE" in sources[0].read_bytes()
        try:
            mod = load(name=f"switchyard_{op}_{isa}", sources=[str(s) for s in sources], extra_cflags=_flags(isa),
                       # a copy: load() appends torch's own link flags to the list it is given, which would
                       # change every later build directory's hash in this process (and rebuild each op)
                       extra_ldflags=list(LDFLAGS), build_directory=str(build), is_python_module=python_module,
                       verbose=False)
        except Exception as e:
            _failed[(op, isa)] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            raise RuntimeError(f"fused {op}: building {sources[0].name} for {isa} failed: {e}") from e
        if python_module:
            _modules[(op, isa)] = mod
        _loaded[(op, isa)] = getattr(torch.ops, f"switchyard_{isa}")
        return _loaded[(op, isa)]


def module(op: str, isa: str | None = None) -> Any:
    """The Python module of ``csrc/<op>.cpp`` (built and loaded as ``library`` does), for a source that
    also exposes its entry points through pybind11: a call that way costs about 1.8 us less than
    through ``torch.ops`` (no schema parsing into IValues, no dispatcher), a sizeable part of a small
    call. ``None`` for a source without one. Eager use only: graphs and autograd take the torch ops."""
    isa = isa or _forced or _env_isa()
    mod = _modules.get((op, isa))
    if mod is None and (op, isa) not in _loaded:
        library(op, isa)
        mod = _modules.get((op, isa))
    return mod


def prebuild(ops: list[str] | None = None, jobs: int | None = None,
             isas: tuple[str, ...] | None = None) -> dict[str, str | None]:
    """Build several ops' libraries at once, one compiler process per (op, level) (a single-file build
    uses one core, so on N cores this is up to N times faster than building them one after the other at
    first use). ``isas`` defaults to ``(default_isa(),)``. Returns "op" (or "op[isa]" for a level other
    than the default) -> None when built, or the reason it could not be. Never raises."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    levels = isas or (default_isa(),)
    names = ops if ops is not None else sorted(p.stem for p in CSRC.glob("*.cpp"))
    todo = [(op, isa) for isa in levels for op in names if not is_built(op, isa)]
    label = {(op, isa): op if isa == default_isa() else f"{op}[{isa}]" for op, isa in todo}
    reason = unavailable_reason()
    if reason:
        return {label[t]: reason for t in todo}
    code = "import sys; from plugins.fused import _build; _build.library(sys.argv[1], sys.argv[2])"
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))

    def one(task: tuple[str, str]) -> str | None:
        done = subprocess.run([sys.executable, "-c", code, *task], capture_output=True, text=True, env=env)
        return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["build failed"])[-1]

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        return dict(zip((label[t] for t in todo), pool.map(one, todo)))


def triton_reason() -> str | None:
    """Why the Triton kernels cannot run here, or None. They need CUDA (or TRITON_INTERPRET=1 on the CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    return None
