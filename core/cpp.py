"""C++ compiled at first use: the tools' checks and the build cache's place, shared by the dispatcher's
hot-path keys (``core.hotpath``) and the fused backend's kernels (``plugins.fused._build``).

Builds go through ``torch.utils.cpp_extension.load`` (ninja and a C++ compiler), into one folder per
source hash and flags under ``build_root()``, so a stale build is never loaded. ``SWITCHYARD_DISABLE_CPP=1``
turns every build off; what then runs instead is pure Python.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

ENV_DISABLE = "SWITCHYARD_DISABLE_CPP"
ENV_BUILD_DIR = "SWITCHYARD_BUILD_DIR"


def compiler() -> str | None:
    """The C++ compiler torch's extension tooling will call: ``$CXX``, else ``c++``, ``g++``, ``clang++``."""
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


def disabled_reason() -> str | None:
    """``SWITCHYARD_DISABLE_CPP=1``'s reason, or None: switched off, nothing compiled is used, built or not."""
    if os.environ.get(ENV_DISABLE, "") in ("1", "true"):
        return f"C++ kernels are disabled by {ENV_DISABLE}=1"
    return None


def tools_reason() -> str | None:
    """Why nothing can be compiled here (switched off, no compiler, no ninja), or None. Cheap."""
    reason = disabled_reason()
    if reason:
        return reason
    if compiler() is None:
        return "no C++ compiler found (looked for $CXX, c++, g++ and clang++ on PATH); install g++ to enable it"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary beside Python)
        except ImportError:
            return "the ninja build tool is not installed (pip install ninja)"
    return None


def put_ninja_on_path() -> None:
    """The pip package's ninja binary on PATH, when the system has none (torch's tooling calls ``ninja``)."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_root() -> Path:
    """``SWITCHYARD_BUILD_DIR``, else ``build/`` in the cache directory."""
    from core.cache import cache_dir

    env = os.environ.get(ENV_BUILD_DIR)
    return Path(env).expanduser() if env else cache_dir() / "build"
