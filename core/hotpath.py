"""The warm-call memo keys in C++ (``csrc/hotpath.cpp``), where a compiler is present.

A warm call is served from the dispatcher's memo, found by the spec's fast key (and, for a
differentiable op, a grad mark). Those keys read a dozen tensor attributes. Right after a kernel that
streamed megabytes through the caches, each getter's code and data come back from far away: the Python
key and grad mark of an attention call then took 10-12 us on the Xeon (1.5 us back to back). Read from
the TensorImpl in C++, the same key takes about 2 us cold and 0.15 us warm. ``keys()`` gives, for the
ops this source covers, a function ``(args, attrs) -> key | None`` drawing the same distinctions as the
spec's own ``fast_key`` plus the grad mark; the dispatcher uses the specs' Python keys for the others,
and for all of them where this module is not built.

Built with torch's extension tooling into its own folder under the build cache (``core.cpp``), named by
a hash of the source, the flags, torch's and Python's versions: a stale build is never loaded. It is
built at the first miss of a process that finds it missing (about 15 s, once per environment; a log
line says so), or ahead of time by ``python -m core.autotune --build``. A built one loads in about a
millisecond at import. ``SWITCHYARD_DISABLE_CPP=1`` keeps it off, like the fused kernels.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import platform
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from core import cpp

SOURCE = Path(__file__).resolve().parent / "csrc" / "hotpath.cpp"
NAME = "switchyard_hotpath"
FLAGS = ["-O2", "-std=c++17"]
OPS = {"attention": "attention_key", "precision_cast": "precision_cast_key"}

_lock = threading.Lock()
_module: Any = None
_failed: str | None = None


def build_dir() -> Path:
    import torch

    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(FLAGS).encode())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}".encode())
    return cpp.build_root() / f"hotpath-{h.hexdigest()[:16]}"


def _library_path() -> Path:
    return build_dir() / f"{NAME}.so"


def is_built() -> bool:
    return _library_path().exists()


def unavailable_reason() -> str | None:
    """Why the C++ keys are not in use here (None when they are loaded or can be built)."""
    if _module is not None:
        return None
    return cpp.tools_reason() or (f"its C++ build failed earlier in this process: {_failed}" if _failed else None)


def load(build: bool = False) -> Any:
    """The loaded module, or None: built ones load; ``build`` compiles a missing one first. Never raises
    (a failed build is remembered and said by ``unavailable_reason``)."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is not None or cpp.disabled_reason() is not None:
            return _module
        try:
            path = _library_path()
            if path.exists():  # a built module needs no compiler or ninja: no PATH look-ups at import
                spec = importlib.util.spec_from_file_location(NAME, path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                _module = module
            elif build and cpp.tools_reason() is None:
                _module = _compile(path.parent)
        except Exception as e:  # the dispatcher goes on with the Python keys
            _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            logging.getLogger("switchyard.build").warning("switchyard: the hot path's C++ keys are off: %s", _failed)
    return _module


def _compile(folder: Path) -> Any:
    from torch.utils.cpp_extension import load as torch_load

    cpp.put_ninja_on_path()
    folder.mkdir(parents=True, exist_ok=True)
    logging.getLogger("switchyard.build").warning(
        "switchyard: compiling the dispatcher's C++ memo keys (first use of this source; about 15 s, cached "
        "afterwards; `python -m core.autotune --build` does it ahead of time)")
    return torch_load(name=NAME, sources=[str(SOURCE)], extra_cflags=list(FLAGS), build_directory=str(folder),
                      is_python_module=True, verbose=False)


def keys(build: bool = False) -> dict[str, Callable[[tuple[Any, ...], dict[str, Any]], Any]]:
    """op -> its C++ memo key function, for the ops covered; empty where the module is not loaded."""
    module = load(build)
    return {op: getattr(module, fn) for op, fn in OPS.items()} if module is not None else {}


def start_build() -> threading.Thread | None:
    """Build a missing module on a thread (beside the fused kernels' compilers); None when there is
    nothing to build. ``join()`` the thread, then ``unavailable_reason()`` says whether it failed."""
    if _module is not None or is_built() or unavailable_reason() is not None:
        return None
    thread = threading.Thread(target=load, args=(True,), name="switchyard-hotpath-build", daemon=True)
    thread.start()
    return thread
