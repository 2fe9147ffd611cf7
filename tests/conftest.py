"""Test-wide settings: Triton kernels run in the interpreter on CPU tensors, and every test session
tunes into its own empty cache directory (compiled C++ kernels stay in the user's build cache, so a
second run does not recompile)."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
if "SWITCHYARD_BUILD_DIR" not in os.environ:
    import platformdirs

    os.environ["SWITCHYARD_BUILD_DIR"] = os.path.join(platformdirs.user_cache_dir("switchyard"), "build")
os.environ["SWITCHYARD_CACHE_DIR"] = tempfile.mkdtemp(prefix="switchyard-test-cache-")
for _var in ("SWITCHYARD_BACKEND", "SWITCHYARD_VALIDATE", "SWITCHYARD_AUTOTUNE", "SWITCHYARD_BLOCK"):
    os.environ.pop(_var, None)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the fused C++ kernels that have no cached build yet, all at once (one compiler per core),
    instead of one after another at first use inside the tests: the machine's level, and the AVX2 level
    too where the machine has a better one (the suite checks the AVX2 paths on AVX-512 machines); and
    the dispatcher's C++ memo keys beside them."""
    from core import hotpath
    from plugins.fused import _build

    hot = hotpath.start_build()  # the dispatcher's C++ memo keys
    levels = tuple(isa for isa in _build.supported_isas() if isa != "scalar")
    for op, reason in _build.prebuild(isas=levels).items():
        if reason:
            print(f"fused {op}: not built: {reason}")
    if hot is not None:
        hot.join()
    if hotpath.unavailable_reason():
        print(f"the dispatcher's C++ memo keys: not built: {hotpath.unavailable_reason()}")


@pytest.fixture(autouse=True)
def _registry_follows_environment():
    """A test that blocked plugins through the environment (monkeypatch) leaves a registry loaded
    under that block list; once the environment is restored, load it again so later tests see the
    plugins the environment really asks for."""
    yield
    from registry import loader

    if loader._registry is not None and loader._registry.settings != loader.settings():
        loader.reload()


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded generator: every test draws new random inputs, reproducibly per seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"generator seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def fresh_dispatch(monkeypatch, tmp_path):
    """An empty tuning cache and a fresh dispatcher state for one test (modules that want it for every
    test wrap it in an autouse fixture of their own)."""
    from core import dispatcher

    monkeypatch.setenv("SWITCHYARD_CACHE_DIR", str(tmp_path / "cache"))
    dispatcher.reset()
    yield
    dispatcher.reset()


@pytest.fixture
def plugin():
    """Register an in-process plugin for one test: ``plugin(obj, name)``; unregistered (and dispatch
    state reset) after."""
    from core import dispatcher
    from registry import loader

    added = []

    def add(obj, name):
        added.append(name)
        loader.add_plugin(obj, name)

    yield add
    for name in added:
        loader.remove_plugin(name)
    dispatcher.reset()
