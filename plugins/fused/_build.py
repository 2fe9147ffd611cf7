"""Compile-at-first-use for the fused backend's C++ kernels, kept in one place for every op.

Each ``csrc/<op>.cpp`` holds its kernels and a ``TORCH_LIBRARY_FRAGMENT(switchyard, m)`` block, and
includes only ATen (not ``torch/extension.h``), which halves the compile time. ``library(op)`` builds
it through ``torch.utils.cpp_extension.load`` into the project's cache directory (one folder per
source hash, compiler flags, torch and Python version, so a stale build is never loaded), loads it,
and returns ``torch.ops.switchyard``. The first build of an op takes about 10-30 s; later processes
load the cached library in milliseconds. When no compiler is present, ``unavailable_reason()`` says
so, every fused CPU kernel declares it as its reason, and dispatch goes on without them.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

CSRC = Path(__file__).resolve().parent / "csrc"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]
LDFLAGS = ["-fopenmp"]
ENV_DISABLE = "SWITCHYARD_DISABLE_CPP"

_lock = threading.Lock()
_loaded: dict[str, Any] = {}
_failed: dict[str, str] = {}


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


def unavailable_reason(op: str | None = None) -> str | None:
    """Why the C++ kernels (of ``op``) cannot be built here, or None when they can. Cheap."""
    if os.environ.get(ENV_DISABLE, "") in ("1", "true"):
        return f"C++ kernels are disabled by {ENV_DISABLE}=1"
    if _compiler() is None:
        return "no C++ compiler found (looked for $CXX, c++, g++ and clang++ on PATH); install g++ to enable it"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary beside Python)
        except ImportError:
            return "the ninja build tool is not installed (pip install ninja)"
    if op is not None and op in _failed:
        return f"its C++ build failed earlier in this process: {_failed[op]}"
    return None


def build_root() -> Path:
    """``SWITCHYARD_BUILD_DIR``, else ``build/`` in the cache directory."""
    from core.cache import cache_dir

    env = os.environ.get("SWITCHYARD_BUILD_DIR")
    return Path(env).expanduser() if env else cache_dir() / "build"


def _build_dir(op: str, sources: list[Path]) -> Path:
    from core.cache import cpu_model
    import torch

    h = hashlib.sha256()
    for src in sources:
        h.update(src.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}|{cpu_model()}".encode())
    return build_root() / f"{op}-{h.hexdigest()[:16]}"


def is_built(op: str) -> bool:
    """Whether ``csrc/<op>.cpp`` has a cached build for this source, these flags and this machine."""
    source = CSRC / f"{op}.cpp"
    return source.exists() and (_build_dir(op, [source]) / f"switchyard_{op}.so").exists()


def library(op: str) -> Any:
    """Build (first use) and load ``csrc/<op>.cpp``; returns the ``torch.ops.switchyard`` namespace."""
    if op in _loaded:
        return _loaded[op]
    with _lock:
        if op in _loaded:
            return _loaded[op]
        reason = unavailable_reason(op)
        if reason:
            raise RuntimeError(f"fused {op}: {reason}")
        import torch
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the pip package's binary, when the system has none
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        sources = [CSRC / f"{op}.cpp"]
        build = _build_dir(op, sources)
        build.mkdir(parents=True, exist_ok=True)
        try:
            load(name=f"switchyard_{op}", sources=[str(s) for s in sources], extra_cflags=CFLAGS,
                 extra_ldflags=LDFLAGS, build_directory=str(build), is_python_module=False, verbose=False)
        except Exception as e:
            _failed[op] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            raise RuntimeError(f"fused {op}: building {sources[0].name} failed: {e}") from e
        _loaded[op] = torch.ops.switchyard
        return _loaded[op]


def prebuild(ops: list[str] | None = None, jobs: int | None = None) -> dict[str, str | None]:
    """Build several ops' libraries at once, one compiler process per op (a single-file build uses one
    core, so on N cores this is up to N times faster than building them one after the other at first
    use). Returns op -> None when built, or the reason it could not be. Never raises."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    ops = [op for op in (ops if ops is not None else sorted(p.stem for p in CSRC.glob("*.cpp"))) if not is_built(op)]
    reason = unavailable_reason()
    if reason:
        return {op: reason for op in ops}
    code = "import sys; from plugins.fused import _build; _build.library(sys.argv[1])"
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))

    def one(op: str) -> str | None:
        done = subprocess.run([sys.executable, "-c", code, op], capture_output=True, text=True, env=env)
        return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["build failed"])[-1]

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        return dict(zip(ops, pool.map(one, ops)))


def triton_reason() -> str | None:
    """Why the Triton kernels cannot run here, or None. They need CUDA (or TRITON_INTERPRET=1 on the CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    return None
